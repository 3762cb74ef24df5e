"""dn2.bench protocols on small synthetic embeddings, report writing, and one `dn2 bench` run on images."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from sklearn.metrics import roc_auc_score

from dn2 import KNNDetector
from dn2.bench import (
    BenchData,
    backbones,
    fewshot,
    group,
    impurity,
    kmeans_centres,
    multimodal,
    neighbours,
    run_protocols,
    set_task,
    unimodal,
)
from dn2.cli import main
from dn2.bench.report import Plot, Table, write_html, write_table


def clusters(name: str = "synthetic", n_classes: int = 4, n_train: int = 30, n_test: int = 20, dim: int = 16, seed: int = 0) -> BenchData:
    """One Gaussian cluster per class, well separated (centres ~4 apart per axis, unit noise)."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(0.0, 4.0, (n_classes, dim))
    y_train, y_test = np.repeat(np.arange(n_classes), n_train), np.repeat(np.arange(n_classes), n_test)
    return BenchData(
        name, [f"class{c}" for c in range(n_classes)],
        centres[y_train] + rng.normal(size=(len(y_train), dim)), y_train,
        centres[y_test] + rng.normal(size=(len(y_test), dim)), y_test,
    )


@pytest.fixture(scope="module")
def data() -> BenchData:
    return clusters()


def test_unimodal_scores_each_class_as_normal_like_a_knn_detector(data: BenchData) -> None:
    table = unimodal(data, k=2)

    assert table.columns == ["normal class", "train images", "ROCAUC %"]
    assert table.column("normal class") == ["class0", "class1", "class2", "class3", "mean"]
    assert table.column("train images") == [30, 30, 30, 30, 120]
    assert table.row("mean")["ROCAUC %"] > 90.0
    # the same number by hand: class 2 normal, every other test image an anomaly
    detector = KNNDetector(k=2).fit(data.train_of(2))
    expected = 100 * roc_auc_score(data.y_test != 2, detector.anomaly_score(data.x_test))
    assert table.row("class2")["ROCAUC %"] == pytest.approx(expected)


def test_paper_number_is_shown_only_for_the_papers_dataset(data: BenchData) -> None:
    assert "paper %" not in unimodal(data).columns

    cifar = clusters(name="cifar10-jpeg", n_classes=10, n_train=5, n_test=3)
    table = unimodal(cifar)
    assert table.row("mean")["paper %"] == 92.5
    assert table.row("class0")["paper %"] is None
    assert multimodal(cifar).row("mean")["paper %"] == 71.7


def test_multimodal_holds_one_class_out_as_the_anomaly(data: BenchData) -> None:
    table = multimodal(data, k=2)

    assert table.column("anomalous class")[-1] == "mean"
    assert table.row("mean")["ROCAUC %"] > 90.0
    normal = data.y_train != 1
    detector = KNNDetector(k=2).fit(data.x_train[normal])
    expected = 100 * roc_auc_score(data.y_test == 1, detector.anomaly_score(data.x_test))
    assert table.row("class1")["ROCAUC %"] == pytest.approx(expected)


def test_fewshot_uses_n_images_per_class_and_k_at_most_n(data: BenchData) -> None:
    table = fewshot(data, k=2, seeds=2)

    assert table.columns == ["N", "k used", "ROCAUC %", "std", "seeds"]
    assert table.column("N")[:-1] == [1, 2, 5, 10, 20]  # 50, 100, 500 exceed the 30 training images
    assert table.row(1)["k used"] == 1
    assert table.row(1)["seeds"] == 2 and table.row(1)["std"] >= 0.0
    assert table.rows[-1][0].startswith("all")
    assert table.rows[-1][2] == pytest.approx(unimodal(data).row("mean")["ROCAUC %"])


def test_impurity_hurts_and_cleaning_helps(data: BenchData) -> None:
    table = impurity(data, k=2, seeds=2)

    assert table.column("impurity %") == [0.0, 2.0, 5.0, 10.0, 15.0, 20.0]
    clean_column = "cleaned (50% dropped) ROCAUC %"
    at_0, at_20 = table.row(0.0), table.row(20.0)
    assert at_0["ROCAUC %"] == pytest.approx(unimodal(data).row("mean")["ROCAUC %"])
    assert at_20["ROCAUC %"] < at_0["ROCAUC %"]
    assert at_20[clean_column] >= at_20["ROCAUC %"]


def test_neighbours_sweeps_k_up_to_the_smallest_class(data: BenchData) -> None:
    table = neighbours(data)

    assert table.column("k") == [1, 2, 3, 5, 10, 20]
    assert table.row(2)["unimodal ROCAUC %"] == pytest.approx(unimodal(data, k=2).row("mean")["ROCAUC %"])
    assert table.row(5)["multimodal ROCAUC %"] == pytest.approx(multimodal(data, k=5).row("mean")["ROCAUC %"])


def test_backbones_gives_one_unimodal_row_per_backbone(data: BenchData) -> None:
    other = clusters(seed=1)
    table = backbones({"net_a": data, "net_b": other}, k=2)

    assert table.column("backbone") == ["net_a", "net_b"]
    assert table.columns[:3] == ["backbone", "dim", "mean ROCAUC %"] and len(table.columns) == 3 + 4
    assert table.row("net_b")["mean ROCAUC %"] == pytest.approx(unimodal(other).row("mean")["ROCAUC %"])


def test_kmeans_with_every_image_as_a_centre_equals_full_knn(data: BenchData) -> None:
    table = kmeans_centres(data, k=2, centres=(1, 3, 30))

    assert table.column("centres C") == ["1", "3", "30", "all (kNN)"]
    assert table.row("1")["k used"] == 1
    assert table.row("30")["ROCAUC %"] == pytest.approx(table.row("all (kNN)")["ROCAUC %"])


def test_group_compares_poolings_for_each_set_size(data: BenchData) -> None:
    table = group(data, k=2, sizes=(2, 3, 4, 5), n_train_sets=200, n_test_sets=100, seeds=1)

    assert table.column("M") == [2, 3, 4]  # only 4 classes
    assert table.columns[1:] == ["concat ROCAUC %", "concat std", "mean ROCAUC %", "mean std", "max ROCAUC %", "max std"]
    assert all(auc > 90.0 for auc in table.column("mean ROCAUC %"))


def test_set_task_detects_mixed_sets_by_covariance_trace(data: BenchData) -> None:
    table = set_task(data, k=2, n_train_sets=100, n_test_sets=50, seeds=1)

    assert table.column("method") == ["covariance trace", "DN2, mean pooling (k=2)"]
    assert table.row("covariance trace")["ROCAUC %"] > 90.0
    assert table.row("DN2, mean pooling (k=2)")["ROCAUC %"] > 90.0


def test_all_runs_every_protocol_and_reports_its_time(data: BenchData) -> None:
    printed: list[str] = []
    tables = run_protocols("all", {"some_net": data}, k=2, seeds=1, echo=printed.append)

    assert [t.name for t in tables] == ["unimodal", "multimodal", "fewshot", "impurity", "neighbours", "backbones", "kmeans", "group", "sets"]
    assert [line.split(":")[0] for line in printed] == ["unimodal", "multimodal", "fewshot", "impurity", "neighbours", "backbones", "kmeans", "group"]
    assert tables[0].rows == unimodal(data, k=2).rows
    assert tables[6].row("all (kNN)")["ROCAUC %"] == pytest.approx(tables[0].row("mean")["ROCAUC %"])


def test_tables_are_written_as_csv_markdown_png_and_html(tmp_path: Path) -> None:
    table = Table("demo", "Demo sweep", ["k", "ROCAUC %"], [[1, 90.0], [2, 92.5]], notes=["a note"],
                  plot=Plot("k", [("ROCAUC", "ROCAUC %", None)]))

    written = write_table(table, tmp_path / "out")
    assert sorted(p.name for p in written) == ["demo.csv", "demo.md", "demo.png"]
    with open(tmp_path / "out" / "demo.csv") as f:
        assert list(csv.reader(f)) == [["k", "ROCAUC %"], ["1", "90.0"], ["2", "92.5"]]
    markdown = (tmp_path / "out" / "demo.md").read_text()
    assert "| 2 | 92.5 |" in markdown and "![Demo sweep](demo.png)" in markdown
    assert (tmp_path / "out" / "demo.png").read_bytes().startswith(b"\x89PNG")

    index = write_html([table], tmp_path / "report", title="bench")
    page = index.read_text()
    assert '<img src="data:image/png;base64,' in page and "<td>92.5</td>" in page
    assert {"index.html", "report.md", "demo.csv", "demo.md", "demo.png"} <= {p.name for p in (tmp_path / "report").iterdir()}


def test_dn2_bench_unimodal_on_a_class_folder_dataset(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    colours = {"red": (200, 30, 30), "green": (30, 180, 40), "blue": (30, 40, 200)}
    rng = np.random.default_rng(0)
    for split, n in (("train", 4), ("test", 2)):
        for name, rgb in colours.items():
            (tmp_path / "data" / split / name).mkdir(parents=True)
            for i in range(n):
                pixels = np.clip(np.array(rgb) + rng.normal(0, 20, (32, 32, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(tmp_path / "data" / split / name / f"{i}.png")
    out = tmp_path / "out"

    code = main(["bench", "unimodal", "--data", str(tmp_path / "data"), "--out", str(out),
                 "--cache-dir", str(tmp_path / "cache"), "--quiet", "--workers", "0"])

    printed = capsys.readouterr().out
    assert code == 0
    assert "embedded train: 12 images with efficientnet_lite0" in printed and "unimodal:" in printed
    assert {"unimodal.csv", "unimodal.md", "unimodal.png"} <= {p.name for p in out.iterdir()}
    with open(out / "unimodal.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["normal class"] for r in rows] == ["blue", "green", "red", "mean"]
    assert float(rows[-1]["ROCAUC %"]) > 90.0  # plain colours are easy to tell apart
    assert any((tmp_path / "cache").iterdir())  # embeddings were cached for the next run


def test_normalize_l2_gives_what_a_detector_with_normalize_l2_gives(data: BenchData) -> None:
    from dn2.bench import normalized

    table = unimodal(normalized(data, "l2"), k=2)
    detector = KNNDetector(k=2, normalize="l2").fit(data.train_of(1))
    expected = 100 * roc_auc_score(data.y_test != 1, detector.anomaly_score(data.x_test))
    assert table.row("class1")["ROCAUC %"] == pytest.approx(expected, rel=1e-5)
    with pytest.raises(ValueError, match="ablation"):
        normalized(data, "whiten")
