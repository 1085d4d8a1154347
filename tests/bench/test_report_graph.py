"""Rows replaying CUDA graphs are compared with the baseline's graph row (both without the
host's launch time), not with the eager baseline."""
from gpuquant.bench import report
from tests.bench.test_harness import _row


def test_graph_rows_are_compared_with_the_baseline_graph_row():
    rows = [_row("float", {"m": 1}, 20.0), _row("float-graph", {"m": 1}, 16.0),
            _row("gpuquant-qat", {"m": 1}, 40.0), _row("gpuquant-qat-graph", {"m": 1}, 19.2),
            _row("float", {"m": 2}, 10.0), _row("gpuquant-qat-graph", {"m": 2}, 5.0)]
    doc = {"baseline": "float", "ceilings": None, "rows": rows}
    (_, one), (_, two) = report.annotate(doc)
    by = {r["provider"]: r for r in one}
    assert by["gpuquant-qat"]["ratio"] == 0.5 and by["gpuquant-qat"]["ratio_vs"] == "float"
    assert by["gpuquant-qat-graph"]["ratio_vs"] == "float-graph"
    assert by["gpuquant-qat-graph"]["ratio"] == 16.0 / 19.2
    assert by["float-graph"]["ratio_vs"] == "float" and by["float-graph"]["ratio"] == 1.25
    # no baseline graph row for these params: the eager baseline
    g = {r["provider"]: r for r in two}["gpuquant-qat-graph"]
    assert g["ratio_vs"] == "float" and g["ratio"] == 2.0
    lines = report.summary_lines([dict(doc, suite="qat_step")])
    assert any("gpuquant-qat-graph" in ln and "vs float-graph" in ln for ln in lines)


def test_readme_table_marks_suites_cut_short_and_prefers_finished_ones(tmp_path):
    from gpuquant.bench import readme_table
    from tests.bench.test_harness import _sample_doc
    res = tmp_path / "results" / "gpu"
    res.mkdir(parents=True)
    report.write_json(_sample_doc("GPU", 3.0, 1.0), str(res / "quant.json"))
    report.write_json(_sample_doc("GPU", 3.0, 9.0), str(res / "quant.partial.json"))  # stale
    gemm = _sample_doc("GPU", 2.0, 1.0)
    gemm["suite"] = "gemm"
    for row in gemm["rows"]:
        row["suite"] = "gemm"
    report.write_json(gemm, str(res / "gemm.partial.json"))
    block = readme_table.render_results(str(tmp_path / "results"))
    assert block.count("#### `quant` on GPU") == 1 and block.count("(cut short)") == 1
    assert "#### `gemm (cut short)` on GPU" in block
