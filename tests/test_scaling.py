"""The α-β model of ddcnn.scaling against cases computed by hand: the ring's volume, DDP's buckets, what each hook
sends, the bounds of overlap, and the limits of a free link (α = 0, β → ∞)."""

from __future__ import annotations

import math

import pytest

from ddcnn import scaling
from ddcnn.scaling import Bucket, Link, StepCompute

MIB = 1024 * 1024


def test_a_ring_allreduce_sends_2_p_minus_1_over_p_of_the_bytes():
    assert scaling.ring_allreduce_bytes(1000, 2) == 1000  # two processes: each sends half, twice
    assert scaling.ring_allreduce_bytes(1000, 4) == 1500
    assert scaling.ring_allreduce_bytes(1000, 1024) == pytest.approx(2000 * 1023 / 1024)
    assert scaling.ring_allreduce_bytes(1000, 1) == 0


def test_ring_times_are_latency_steps_plus_bytes_over_bandwidth():
    link = Link(alpha=1e-3, beta=1e6)
    # P = 4, 1 MB: 6 steps of 1 ms, and 1.5 MB through a link of 1 MB/s
    assert scaling.ring_allreduce_seconds(1e6, 4, link) == pytest.approx(6e-3 + 1.5)
    # an all-gather is half of an all-reduce: 3 steps, 0.75 MB
    assert scaling.ring_allgather_seconds(1e6, 4, link) == pytest.approx(3e-3 + 0.75)
    assert scaling.ring_allreduce_seconds(1e6, 1, link) == 0 == scaling.ring_allgather_seconds(1e6, 1, link)


def test_limits_of_a_free_link():
    no_latency = Link(alpha=0.0, beta=1e6)
    assert scaling.ring_allreduce_seconds(2e6, 2, no_latency) == pytest.approx(2.0)  # bytes over beta only
    infinite_bandwidth = Link(alpha=1e-4, beta=math.inf)
    assert scaling.ring_allreduce_seconds(1e12, 8, infinite_bandwidth) == pytest.approx(14e-4)  # 2(P-1) alphas
    free = Link(alpha=0.0, beta=math.inf)
    compute = StepCompute(forward=0.1, backward=0.2, optimizer=0.05)
    step_buckets = scaling.ddp_buckets([(1000, 1000)] * 30)
    assert scaling.ddp_step_seconds(compute, step_buckets, 64, free) == pytest.approx(compute.total)


def test_a_link_needs_positive_bandwidth_and_no_negative_latency():
    with pytest.raises(ValueError):
        Link(alpha=-1.0, beta=1.0)
    with pytest.raises(ValueError):
        Link(alpha=0.0, beta=0.0)
    assert Link.from_ratio(1e9, 100.0).beta == pytest.approx(1e7)  # 1 GFLOP/s at 100 FLOP per byte: 10 MB/s


def test_buckets_follow_backward_order_and_ddp_caps():
    # in the model's order: 0.5 MiB, 0.75 MiB, 10 MiB, 20 MiB, 1 MiB (4-byte elements)
    shapes = [(MIB // 8,), (3 * MIB // 16,), (10 * MIB // 4,), (5 * MIB,), (MIB // 4,)]
    # backward order 4, 3, 2, 1, 0: the 1 MiB of parameter 4 fills the first bucket (cap 1 MiB) on its own; then
    # 20 MiB + 10 MiB reach 25 MiB at parameter 2; parameters 1 and 0 are left over
    assert scaling.buckets(shapes) == [[4], [3, 2], [1, 0]]
    assert len(scaling.buckets([(1000,)] * 10)) == 1  # 40 kB: one bucket
    assert scaling.buckets([]) == []


def test_vgg9_at_half_width_fits_one_bucket():
    """0.97 MB of gradients is under DDP's first bucket of 1 MiB: one all-reduce, after all of backward."""
    step_buckets = scaling.ddp_buckets([(241_786,)])
    assert len(step_buckets) == 1 and step_buckets[0].ready == 1.0 and step_buckets[0].messages == (967_144,)


def test_what_each_hook_sends():
    shapes = [(64, 32, 3, 3), (64,)]  # a convolution (64 x 288 as a matrix) and its bias
    assert scaling.hook_messages(shapes, "none") == [(64 * 288 + 64) * 4]
    assert scaling.hook_messages(shapes, "fp16") == [(64 * 288 + 64) * 2]
    # PowerSGD rank 1: the bias goes uncompressed (64 x 1 does not compress); P is 64 x 1, Q 288 x 1
    assert scaling.hook_messages(shapes, "powersgd") == [64 * 4, 64 * 4, 288 * 4]
    assert scaling.hook_messages(shapes, "powersgd", powersgd_rank=4) == [64 * 4, 64 * 4 * 4, 288 * 4 * 4]
    with pytest.raises(ValueError):
        scaling.hook_messages(shapes, "int8")


def test_powersgd_compresses_only_where_it_halves_the_bytes():
    assert scaling.powersgd_factor_sizes((10, 10), rank=1) == (10, 10)  # (10 + 10) * 2 = 40 < 100
    assert scaling.powersgd_factor_sizes((4, 4), rank=1) is None  # (4 + 4) * 2 = 16 = 16: not less
    assert scaling.powersgd_factor_sizes((100, 3, 3), rank=2) == (200, 18)  # 100 x 9, r = 2
    assert scaling.powersgd_factor_sizes((100,), rank=1) is None  # a vector: 100 x 1


def test_overlap_hides_communication_behind_backward_within_bounds():
    compute = StepCompute(forward=1.0, backward=2.0, optimizer=0.5)
    link = Link(alpha=0.0, beta=1.0)  # one byte per second, two processes: an all-reduce of m bytes takes m s
    # ready after half and all of backward; 0.5 s and 1 s of communication
    step_buckets = [Bucket(0.5, (0.5,)), Bucket(1.0, (1.0,))]  # type: ignore[arg-type]
    # bucket 1 from 2.0 to 2.5; bucket 2 from 3.0 (end of backward) to 4.0; then the optimizer: 4.5
    assert scaling.ddp_step_seconds(compute, step_buckets, 2, link) == pytest.approx(4.5)
    assert scaling.ddp_step_seconds(compute, step_buckets, 2, link, overlap=False) == pytest.approx(5.0)
    # every bucket ready early: all of the communication hides behind backward
    early = [Bucket(0.0, (0.5,)), Bucket(0.0, (1.0,))]  # type: ignore[arg-type]
    assert scaling.ddp_step_seconds(compute, early, 2, link) == pytest.approx(compute.total)
    for beta in (0.01, 0.3, 1.0, 10.0, 1e6):
        link = Link(alpha=1e-3, beta=beta)
        comm = scaling.communication_seconds(step_buckets, 2, link)
        step = scaling.ddp_step_seconds(compute, step_buckets, 2, link)
        assert max(compute.total, compute.total + comm - compute.backward) - 1e-12 <= step <= compute.total + comm


def test_ddp_epoch_counts_powersgd_plain_steps_apart():
    compute = StepCompute(0.01, 0.02)
    link = Link(alpha=0.0, beta=1e6)
    plain, compressed = [Bucket(1.0, (1_000_000,))], [Bucket(1.0, (0, 10_000, 10_000))]
    # 10 steps of 0.03 s; 2 plain ones send 1 MB each (1 s), 8 compressed ones 20 kB (0.02 s), P = 2
    epoch = scaling.ddp_epoch_seconds(10, compute, compressed, 2, link, 2, plain, epoch_messages=0)
    assert epoch == pytest.approx(10 * 0.03 + 2 * 1.0 + 8 * 0.02)


def test_the_cnn_dnn_local_phase_communicates_nothing_while_p_is_at_most_n():
    compute = StepCompute(forward=0.4, backward=0.8)  # one process holding all 16 local CNNs
    slow = Link(alpha=1.0, beta=1.0)
    # 16 subdomains on 4 processes: each holds 4 of them, a quarter of the arithmetic; only the epoch's metrics move
    epoch = scaling.cnn_dnn_epoch_seconds(10, compute, 16, 4, slow, epoch_messages=0)
    assert epoch == pytest.approx(10 * 1.2 / 4)
    # 4 subdomains on 3 processes: the slowest holds 2 of them
    assert scaling.cnn_dnn_epoch_seconds(10, compute, 4, 3, slow, epoch_messages=0) == pytest.approx(10 * 1.2 / 2)
    # the metrics: one all-reduce of 1 + N float64 per epoch
    with_metrics = scaling.cnn_dnn_epoch_seconds(10, compute, 16, 4, Link(0.0, 1.0), epoch_messages=1)
    assert with_metrics - epoch == pytest.approx(1.5 * 8 * 17)


def test_the_cnn_dnn_beyond_n_processes_trains_each_local_cnn_data_parallel():
    compute = StepCompute(forward=0.4, backward=0.8)
    link = Link(alpha=0.0, beta=1e6)
    local = [Bucket(1.0, (2_000_000,))]
    # 4 subdomains on 16 processes: groups of 4 ranks, each a quarter of the batch on one local CNN (1/16 of the
    # arithmetic: 0.075 s), then a ring all-reduce of 2 MB over 4 ranks: 3 MB through the link, 3 s
    epoch = scaling.cnn_dnn_epoch_seconds(1, compute, 4, 16, link, local, epoch_messages=0)
    assert epoch == pytest.approx(1.2 / 16 + 3.0)


def test_aggregation_gathers_the_padded_shares_and_trains_on_every_process():
    link = Link(alpha=0.0, beta=1000.0)
    # 1,000 images, 4 subdomains on 3 processes (at most 2 each, padded), 10 classes, float32: batches of 512 and
    # 488; the all-gather of each moves (P-1)/P of 512 * 2 * 10 * 4 * 3 bytes
    seconds = scaling.aggregation_seconds(1000, 4, 10, 3, link, probabilities_seconds=4.0, aggregator_seconds=7.0)
    gather = (2 / 3) * (1000 * 2 * 10 * 4 * 3) / 1000
    assert seconds == pytest.approx(4.0 * 2 / 4 + gather + 7.0)
    # one process: no gather, all the probabilities
    assert scaling.aggregation_seconds(1000, 4, 10, 1, link, 4.0, 7.0) == pytest.approx(11.0)


def test_placement_of_subdomains():
    assert [scaling.subdomains_per_process(16, p) for p in (1, 2, 3, 16, 64)] == [16, 8, 6, 1, 1]
    assert [scaling.group_size(4, p) for p in (2, 4, 6, 8, 1024)] == [1, 1, 1, 2, 256]
    assert scaling.steps_per_epoch(6000, 64) == 93


def test_a_synchronous_step_waits_for_the_slowest_process():
    # two processes, each taking 1 s or 2 s with equal chance: the step takes 2 s unless both take 1 s (1/4)
    assert scaling.expected_maximum([[1.0, 2.0], [1.0, 2.0]]) == pytest.approx(1.75)
    assert scaling.expected_maximum([[3.0]]) == pytest.approx(3.0)
    assert scaling.expected_maximum([[1.0, 1.0], [2.0]]) == pytest.approx(2.0)


def test_step_compute_scales_its_parts():
    step = StepCompute(forward=1.0, backward=2.0, optimizer=1.0)
    assert step.scaled(2.0) == StepCompute(2.0, 4.0, 1.0)  # more arithmetic; the optimizer's step is per step
    assert step.scaled_to(2.0) == StepCompute(0.5, 1.0, 0.5)
