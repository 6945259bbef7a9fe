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


def _rows(epochs, loss, subdomains=0):
    rows = []
    for e in range(1, epochs + 1):
        row = {"epoch": e, "train_loss": loss, "train_accuracy": 0.5, "val_loss": loss, "val_accuracy": 0.5}
        if subdomains:
            row["train_subdomain_accuracy"] = [0.5] * subdomains
        rows.append(row)
    return rows


def test_curves_mark_every_epoch_average_the_local_loss_and_tick_whole_epochs(tmp_path, monkeypatch):
    """One epoch is a point (a marker, not an empty line); the local phase's loss, summed over its 4 local CNNs,
    is drawn per local CNN (on the scale of the others, and its label says so); epochs are ticked as integers."""
    import matplotlib.pyplot as plt

    from ddcnn import plots

    figures = []
    monkeypatch.setattr(plots, "_save", lambda fig, path, **kw: figures.append(fig))
    plots.plot_curves({"local": _rows(1, 8.0, subdomains=4), "coherent": _rows(1, 2.0)}, tmp_path / "c.png")
    ax_loss, ax_acc = figures[0].axes
    lines = {line.get_label(): line for line in ax_loss.get_lines()}
    assert set(lines) == {"local (mean of 4 local CNNs) train", "local (mean of 4 local CNNs) val", "coherent train",
                          "coherent val"}
    assert list(lines["local (mean of 4 local CNNs) train"].get_ydata()) == [2.0]
    assert all(line.get_marker() not in (None, "None", "", " ") for line in lines.values())
    assert list(ax_loss.get_xticks()) == [1]
    plt.close(figures[0])
    figures.clear()
    plots.plot_curves({"global": _rows(30, 1.0)}, tmp_path / "c.png")
    assert all(float(t).is_integer() for t in figures[0].axes[0].get_xticks())
    plt.close(figures[0])


def test_accuracy_bars_have_error_bars_only_for_several_seeds_and_fit_the_axis(tmp_path, monkeypatch):
    import matplotlib.pyplot as plt

    from ddcnn import plots

    figures = []
    monkeypatch.setattr(plots, "_save", lambda fig, path, **kw: figures.append(fig))
    plots.plot_method_accuracy({"local": {"2x2": (0.95, None)}, "mean": {"2x2": (0.97, None)}}, tmp_path / "a.png")
    ax = figures[0].axes[0]
    assert not ax.collections  # no error bars (matplotlib draws them as line collections)
    assert ax.get_ylim() == (0.9, 1.0)  # the data's range, not from near 0
    plt.close(figures[0])
    figures.clear()
    plots.plot_method_accuracy({"local": {"2x2": (0.1, 0.02)}, "mean": {"2x2": (0.7, 0.05)}}, tmp_path / "a.png")
    ax = figures[0].axes[0]
    assert ax.collections and ax.get_ylim()[0] == 0.0 and ax.get_ylim()[1] <= 0.8
    plt.close(figures[0])
