from ddcnn.plots import _grid_colour, plot_method_accuracy, plot_subdomain_heatmaps


def test_a_grid_keeps_its_colour_with_or_without_the_global_cnn():
    with_global = ["1x1", "2x2", "4x4"]
    without = ["2x2", "4x4"]
    assert [_grid_colour(g, with_global) for g in with_global] == ["C0", "C1", "C2"]
    assert [_grid_colour(g, without) for g in without] == ["C1", "C2"]
    assert _grid_colour("2x2x2", ["1x1", "2x2x2"]) == "C1"


def test_plots_write_png_files(tmp_path):
    summary = {"global": {"1x1": (0.6, 0.01)}, "dnn": {"2x2": (0.62, 0.02), "4x4": (0.55, 0.0)}}
    accuracy = plot_method_accuracy(summary, tmp_path / "accuracy.png")
    heatmaps = plot_subdomain_heatmaps(
        {"2x2": ((2, 2), [0.4, 0.5, 0.45, 0.41]), "2x2x2": ((2, 2, 2), [0.7] * 8)}, tmp_path / "subdomains.png"
    )
    for path in (accuracy, heatmaps):
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
