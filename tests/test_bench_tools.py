"""The benchmark helpers (bench/machine.py, bench/report.py's table) on synthetic timings: no
timed code runs here."""

import argparse
import builtins
import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import cases  # noqa: E402
import machine  # noqa: E402
import report  # noqa: E402
from conftest import needs_triton_kernels  # noqa: E402


# ---- --floor-rates ---------------------------------------------------------------------------


def test_parse_floor_rates():
    rates = machine.parse_floor_rates(" 36 , 184 ")
    assert (rates.copy_bytes_per_s, rates.matmul_flops_per_s, rates.source) == (36e9, 184e9, "given")
    assert "36.0 GB/s" in rates.describe() and "184.0 GFLOP/s" in rates.describe() and "given" in rates.describe()


@pytest.mark.parametrize("text", ["36", "36,184,1", "a,184", "0,184", "36,-1", "inf,184", "nan,184", ""])
def test_parse_floor_rates_rejects(text):
    with pytest.raises(ValueError, match="floor-rates"):
        machine.parse_floor_rates(text)


def test_floor_rates_option(capsys):
    parser = argparse.ArgumentParser()
    machine.add_floor_rates_option(parser)
    assert parser.parse_args([]).floor_rates is None
    assert parser.parse_args(["--floor-rates", "36,184"]).floor_rates.matmul_flops_per_s == 184e9
    with pytest.raises(SystemExit):
        parser.parse_args(["--floor-rates", "fast"])
    assert "GBPS,GFLOPS" in capsys.readouterr().err


def test_given_rates_are_not_measured(monkeypatch):
    def fail():
        raise AssertionError("measured although rates were given")

    monkeypatch.setattr(machine, "measure_copy_bandwidth", fail)
    monkeypatch.setattr(machine, "measure_matmul_rate", fail)
    given = machine.parse_floor_rates("10,100")
    assert machine.floor_rates(given, threads=2) is given


def test_floor_uses_the_rates():
    # 16->16@112, batch 1: 32 channels x 12544 pixels x 4 bytes; 2 * 12544 * (16*8 + 8*9) FLOPs
    bytes_moved, flops = 32 * 12544 * 4, 2 * 12544 * (16 * 8 + 8 * 9)
    assert cases.floor_ms(16, 16, 112, 1) == pytest.approx(max(bytes_moved / 36e9, flops / 184e9) * 1e3)
    assert cases.floor_ms(16, 16, 112, 1, copy_bytes_per_s=1e9, matmul_flops_per_s=1e12) == pytest.approx(bytes_moved / 1e6)
    assert cases.floor_ms(16, 16, 112, 1, copy_bytes_per_s=1e15, matmul_flops_per_s=1e9) == pytest.approx(flops / 1e6)


def test_cpu_model_falls_back(monkeypatch):
    assert machine.cpu_model()
    real_open = builtins.open

    def no_proc(path, *args, **kwargs):
        if str(path) == "/proc/cpuinfo":
            raise OSError("no /proc here")
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", no_proc)
    monkeypatch.setattr(machine.platform, "processor", lambda: "Test CPU 9000")
    assert machine.cpu_model() == "Test CPU 9000"
    assert "Test CPU 9000, 2 threads" in machine.machine_line(2)


# ---- spread and the noisy flag ------------------------------------------------------------


def test_spread():
    assert machine.spread([2.0] * 20) == 0
    # 1..11: p10 = 2, p90 = 10, median 6
    assert machine.spread(range(1, 12)) == pytest.approx(8 / 6)
    assert math.isnan(machine.spread([1.0]))
    # one outlier among many calls does not make a row noisy; a tenth of slow calls does
    assert machine.spread([1.0] * 99 + [50.0]) == 0
    assert machine.spread([1.0] * 80 + [2.0] * 20) == pytest.approx(1.0)


def test_row_spread_and_flag():
    steady = {"eager": [1.0, 1.01, 0.99] * 5, "fused": [0.1] * 15}
    disturbed = dict(steady, fused=[0.1] * 10 + [0.2] * 5)
    assert machine.row_spread(steady) < 0.05
    assert not machine.is_noisy(machine.row_spread(steady), 0.2)
    assert machine.row_spread(disturbed) == pytest.approx(1.0)
    assert machine.is_noisy(machine.row_spread(disturbed), 0.2)
    assert not machine.is_noisy(machine.row_spread(disturbed), 2.0)


def test_timed_row_keeps_the_samples(monkeypatch):
    synthetic = {"eager": [1.0] * 10, "reference": [0.5] * 10, "fused": [0.1] * 8 + [0.3] * 2}
    monkeypatch.setattr(report, "times_ms", lambda fn: fn())
    fns = {name: (lambda t=t: t) for name, t in synthetic.items()}
    row = report.timed_row("16->16@112", 1, 0.05, fns, noise=0.2)
    assert row["samples"] == synthetic
    assert (row["eager"], row["reference"], row["fused"]) == (1.0, 0.5, 0.1)
    assert row["noisy"] and row["spread"] == pytest.approx(2.0)
    assert not report.timed_row("16->16@112", 1, 0.05, fns, noise=5.0)["noisy"]


def test_repeated_medians():
    # the "7.999 ms" symptom: the fused medians of unrelated shapes within microseconds
    loaded = [93.993, 78.008, 7.998, 2.883, 0.645, 7.995, 47.993, 31.992, 7.997, 55.741, 39.592, 7.998]
    value, count, total = machine.repeated_medians(loaded)
    assert value == pytest.approx(7.9975) and count == 4 and total == 12
    quiet = [0.792, 0.936, 0.123, 3.190, 2.821, 0.264, 0.481, 0.392, 0.089, 0.851, 0.713, 0.136]
    assert machine.repeated_medians(quiet) is None
    # tiny medians may coincide: left out
    assert machine.repeated_medians([0.012, 0.012, 0.012, 0.5, 0.7]) is None


def test_whole_millisecond_medians():
    loaded = [93.993, 78.008, 7.998, 2.883, 0.645, 7.995, 47.993, 31.992, 7.997, 55.741, 39.592, 7.998]
    assert machine.whole_millisecond_medians(loaded) == (8, 11)
    assert machine.whole_millisecond_medians([3.190, 2.821, 1.377, 4.02, 12.5]) is None


def test_noise_summary():
    rows = [dict(noisy=True), dict(noisy=False), dict(noisy=True)]
    lines = machine.noise_summary(rows, 0.2, [1.234, 2.345, 3.456])
    assert len(lines) == 1 and "2 of 3 rows" in lines[0] and "quiet machine" in lines[0]
    lines = machine.noise_summary([dict(noisy=False)] * 4, 0.2, [7.999] * 4)
    assert "no row above" in lines[0]
    assert any("4 of 4 medians read the same 7.999 ms" in line for line in lines)
    assert any("whole millisecond" in line for line in lines)


# ---- table and plot ----------------------------------------------------------------------


def synthetic_rows():
    return [
        dict(shape="16->16@112", batch=1, eager=0.792, reference=0.936, fused=0.123, floor=0.045, spread=0.05, noisy=False),
        dict(shape="24->72@56", batch=1, eager=0.851, reference=0.713, fused=0.136, floor=0.040, spread=0.61, noisy=True),
        dict(shape="160->960@7", batch=8, eager=3.0, reference=2.5, fused=1.0, floor=float("nan"), spread=0.1, noisy=False),
    ]


def test_table_format():
    steady, noisy, _ = synthetic_rows()
    header = report.format_header(report.FORWARD_COLUMNS)
    line = report.format_row(steady, report.FORWARD_COLUMNS)
    assert header.split() == ["shape", "batch", "eager", "reference", "fused", "floor", "speedup", "x", "floor", "spread"]
    assert line.split() == ["16->16@112", "1", "0.792", "0.936", "0.123", "0.045", "6.44x", "2.7x", "5%"]
    assert len(line) == len(header)  # columns line up
    noisy_line = report.format_row(noisy, report.FORWARD_COLUMNS)
    assert noisy_line.endswith("  noisy") and noisy_line.split()[-2] == "61%"
    assert len(noisy_line) == len(header) + len("  noisy")
    backward = report.format_row(dict(steady, floor=float("nan")), report.BACKWARD_COLUMNS)
    assert backward.split()[2:5] == ["0.936", "0.123", "nan"]


def test_plot_writes_a_png(tmp_path):  # matplotlib: in the test extra, so this runs in CI
    path = machine.plot_rows(synthetic_rows(), str(tmp_path / "report.png"), "eager", title="synthetic")
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    # backward tables have no floor: one panel
    rows = [dict(r, floor=float("nan")) for r in synthetic_rows()]
    assert machine.plot_rows(rows, str(tmp_path / "backward.png"), "reference")


def block_matplotlib(monkeypatch):
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError


def test_missing_matplotlib_message(monkeypatch):
    block_matplotlib(monkeypatch)
    with pytest.raises(SystemExit) as error:
        machine.plot_rows(synthetic_rows(), "unused.png", "eager")
    assert "pip install matplotlib" in str(error.value) and "ghostkernels[bench]" in str(error.value)


def test_report_plot_fails_before_timing(monkeypatch, tmp_path):
    block_matplotlib(monkeypatch)

    def no_timing(*args, **kwargs):
        raise AssertionError("timed before checking for matplotlib")

    monkeypatch.setattr(report, "floor_rates", no_timing)
    monkeypatch.setattr(report, "forward_rows", no_timing)
    monkeypatch.setattr(sys, "argv", ["report.py", "--quick", "--plot", str(tmp_path / "x.png")])
    with pytest.raises(SystemExit, match="pip install matplotlib"):
        report.main()


def test_host_path_runs(tmp_path, monkeypatch):
    """bench/host_path.py end to end with a few calls (its numbers are not checked)."""
    import host_path
    out = tmp_path / "host.txt"
    monkeypatch.setattr(sys, "argv", ["host_path.py", "--calls", "10", "--out", str(out)])
    host_path.main()
    lines = out.read_text().splitlines()
    assert lines[-2].startswith("sum of 21") and "dispatcher hop" in lines[-1]


@needs_triton_kernels
def test_gpu_probe_runs_its_stages_on_the_cpu(capsys, monkeypatch):
    """bench/gpu_probe.py's stages and parity checks on CPU tensors (Triton in the interpreter);
    the timing, the variants and the host path need a GPU."""
    import gpu_probe
    monkeypatch.setattr(sys, "argv", ["gpu_probe.py", "--device", "cpu"])
    gpu_probe.main()
    assert "stages ran on the CPU" in capsys.readouterr().out


def test_cold_op_runs(capsys, monkeypatch):
    """bench/cold_op.py end to end with a few calls (its numbers are not checked)."""
    import cold_op
    monkeypatch.setattr(sys, "argv", ["cold_op.py", "--rounds", "1", "--calls", "2"])
    cold_op.main()
    out = capsys.readouterr().out
    assert "160->480@7" in out and "squeeze_excite_gate" in out and "512 MB" in out


@needs_triton_kernels
def test_gpu_report_rows_check_parity(monkeypatch):
    """bench/gpu_report.py's rows on CPU tensors (the Triton columns in the interpreter), with
    do_bench stubbed: the parity checks, including the backward's against float32 autograd with
    the fused forward's own ReLU masks, pass on a right op. The GPU run does the timing."""
    import torch
    import gpu_report
    monkeypatch.setattr(gpu_report, "median", lambda fn: (fn(), 1.0)[1])
    row = gpu_report.forward_row(8, 12, 6, 2, torch.float32, 1e9, 1e9, with_compile=False, device="cpu")
    assert {"eager", "fused_nchw", "eager_cl", "kernel", "library", "floor"} <= set(row) and "compile" not in row
    assert row["chosen"] == "kernel"
    assert gpu_report.training_row(8, 12, 6, 2, torch.float32, device="cpu") == {"eager_train": 1.0,
                                                                                  "fused_train": 1.0}


def test_e2e_bfloat16_contender_restores_the_precision():
    import e2e
    import torch

    before = torch.get_float32_matmul_precision()
    assert e2e.with_matmul_precision("medium", torch.get_float32_matmul_precision)() == "medium"
    assert torch.get_float32_matmul_precision() == before


def test_e2e_parity_table_and_plot(tmp_path):
    """bench/e2e.py's CUDA-side helpers on synthetic rows: the parity rule (half precision within
    twice eager's own error against float32, float32 within 1e-4), the markdown table and the
    images-per-second chart."""
    import torch
    import e2e
    reference = torch.linspace(-1, 1, 100)
    eager_half = reference + 1e-3
    assert e2e.check_parity("accelerated", reference + 1.5e-3, eager_half, reference, torch.float16) < 2e-3
    with pytest.raises(AssertionError, match="allowed 2.0e-03"):
        e2e.check_parity("accelerated", reference + 3e-3, eager_half, reference, torch.float16)
    with pytest.raises(AssertionError, match="allowed 1.0e-04"):
        e2e.check_parity("accelerated", reference + 2e-4, reference, reference, torch.float32)
    rows = [{"model": "ghostnet-1.0", "dtype": "float16", "batch": b, "eager": 2.0 * b, "accelerated": 1.0 * b,
             "captured": 0.5 * b, "errors": {"accelerated": 1e-3, "captured": 1e-3}, "spread": 0.05, "noisy": False}
            for b in (1, 64)]
    e2e.write_markdown(tmp_path / "t.md", "header", rows, ["eager", "accelerated", "captured"], [], set())
    table = (tmp_path / "t.md").read_text()
    assert "| ghostnet-1.0 | float16 | 64 | 128.00 (500) | 64.00 (1000) | 32.00 (2000) | 2.00x | 1.0e-03 / 1.0e-03 |" \
        in table
    e2e.plot_throughput(rows, ["eager", "accelerated", "captured"], tmp_path / "t.png")
    assert (tmp_path / "t.png").read_bytes()[:4] == b"\x89PNG"


def test_e2e_ratios_are_taken_within_rounds():
    """A contender twice as fast in every round is 0.5 of the other in every round, however much the
    machine's speed moved between rounds; bench/e2e.py prints the per-round ratios' median and range
    for the pairs of RATIOS that a row timed."""
    import e2e
    rounds = {"frozen": [[1.0, 1.2], [4.0, 4.0], [9.0, 8.0]], "openvino f32": [[2.0, 2.4], [8.0, 8.0], [17.0, 17.0]]}
    assert cases.round_ratios(rounds, "frozen", "openvino f32") == pytest.approx([0.5, 0.5, 8.5 / 17])
    assert cases.calls_ms(rounds)["frozen"] == [1.0, 1.2, 4.0, 4.0, 9.0, 8.0]
    rows = [{"model": "ghostnet-1.0", "dtype": "float32", "batch": 1,
             "ratios": {("frozen", "openvino f32"): cases.round_ratios(rounds, "frozen", "openvino f32")}},
            {"model": "ghostnet-1.0", "dtype": "float32", "batch": 8, "ratios": {}}]
    lines = e2e.ratio_lines(rows)
    assert "frozen / openvino f32" in lines[1] and "frozen bf16" not in lines[1]
    assert lines[2].endswith("0.500 (0.50-0.50)") and lines[3].endswith("-")
    assert e2e.ratio_lines([{**rows[0], "ratios": {}}]) == []


def test_gpu_report_tunes_every_ghostnet_width():
    import gpu_report
    shapes = gpu_report.ghostnet_shapes()
    assert set(cases.GHOSTNET_SHAPES) <= set(shapes) and (8, 8, 112) in shapes and len(shapes) == len(set(shapes))


def test_block_of():
    import profile_batch1
    assert profile_batch1.block_of("blocks.8.0.ghost1.primary_conv") == "blocks.8.0"
    assert profile_batch1.block_of("blocks.6.1.ghost1.primary_conv.1:node_Conv_1305") == "blocks.6.1"
    assert profile_batch1.block_of("bn1:node_Conv_1191") == profile_batch1.block_of("conv_stem") == "stem"
    assert profile_batch1.block_of("classifier") == profile_batch1.block_of("conv_head") == "head"
    assert profile_batch1.block_of("node_Reorder_3") == "other"
    blocks = ["other", "head", "blocks.10.0", "blocks.2.1", "blocks.2.0", "stem"]
    assert sorted(blocks, key=profile_batch1.block_order) == ["stem", "blocks.2.0", "blocks.2.1", "blocks.10.0",
                                                              "head", "other"]


def test_frozen_graph_by_block():
    """The frozen graph's ops map to their blocks (a fused residual add to its Ghost op's block),
    and one profile's op events line up with them, forward after forward."""
    import profile_batch1
    import torch

    import ghostkernels
    from ghostkernels import models
    torch.manual_seed(0)
    x = torch.randn(1, 3, 32, 32)
    frozen = ghostkernels.freeze(ghostkernels.accelerate(models.ghostnet(width=0.5, fused=False).eval()), x)
    ops = profile_batch1.frozen_op_blocks(frozen)
    blocks = [block for _, block in ops]
    assert blocks[0] == "stem" and blocks[-1] == "head" and "other" not in blocks
    assert blocks == sorted(blocks, key=profile_batch1.block_order)
    assert {f"blocks.{i}.0" for i in range(9)} <= set(blocks)
    fused = [scope for kind, scope in frozen.op_scopes
             if kind in ("ghostkernels::ghost_module_residual", "ghostkernels::pointwise_conv2d_pool")]
    assert fused and all(fused)  # the module of the chain's first node
    assert dict(ops)["ghostkernels::pointwise_conv2d_pool"] == "blocks.9.0"
    with torch.inference_mode():
        by_block = profile_batch1.frozen_blocks_now(frozen, x, 2)
    assert set(by_block) == set(blocks) and all(ms > 0 for ms in by_block.values())


def test_layers_vs_openvino_charges_every_op_to_its_module():
    """bench/layers_vs_openvino.py's side of ours (OpenVINO's needs the package and an export):
    every op event of the frozen graph charged to a module, forward after forward."""
    import layers_vs_openvino
    import torch

    import ghostkernels
    from ghostkernels import models
    assert layers_vs_openvino.module_of("layer3.layers.4.conv2", 2) == "layer3.layers"
    assert layers_vs_openvino.module_of("", 2) == "other"
    torch.manual_seed(0)
    x = torch.randn(1, 3, 32, 32)
    frozen = ghostkernels.freeze(ghostkernels.accelerate(models.ghostnet(width=0.5, fused=False).eval()), x)
    ours = layers_vs_openvino.frozen_ops_by_module(frozen, x, 2, 2)
    assert {f"blocks.{i}" for i in range(10)} <= set(ours) and all(us > 0 for us in ours.values())
    rows = layers_vs_openvino.table(ours, {"blocks.1": 4.0, "only_theirs": 1.0})
    assert [r[0] for r in rows] == [*ours, "only_theirs"] and dict((r[0], r[2]) for r in rows)["blocks.1"] == 4.0


def test_interleaved_rounds_rotate_the_order():
    """Each round starts one contender further along, so no contender always follows the same one."""
    calls = []
    fns = {name: (lambda name=name: calls.append(name)) for name in "abc"}
    rounds = cases.interleaved_rounds_ms(fns, rounds=3, min_time=0.0)
    timed = calls[9:]  # after three warm-up calls each
    firsts = [timed[i] for i in range(len(timed)) if i == 0 or timed[i] != timed[i - 1]]
    assert firsts == ["a", "b", "c", "b", "c", "a", "c", "a", "b"]
    assert all(len(rounds[name]) == 3 and all(len(r) == 2 for r in rounds[name]) for name in "abc")


def test_ab_libraries_mirrors_schemas_and_compares_builds(capsys):
    """bench/ab_libraries.py: the ghostkernels schemas copied into another namespace (where the old
    build's kernels register), a case per shape, op and batch calling each build's namespace, and a
    line per case from the comparison (interleaved_rounds_ms alternates the builds)."""
    import ab_libraries
    import torch
    library = torch.library.Library("ghostkernels_ab_test", "FRAGMENT")
    ab_libraries.mirror_schemas(library)
    ab_libraries.mirror_schemas(library)  # what a namespace already has is left alone
    for name in ("ghost_module", "pointwise_conv2d", "ghost_module_depthwise"):
        old, new = getattr(torch.ops.ghostkernels_ab_test, name), getattr(torch.ops.ghostkernels, name)
        assert str(old.default._schema).split("::")[1] == str(new.default._schema).split("::")[1]

    namespaces = {"old": torch.ops.ghostkernels, "new": torch.ops.ghostkernels}
    cases = ab_libraries.make_cases([(8, 12, 7), (4, 6, 5)], [1, 2], namespaces, depthwise_kernels=(3, 5), stem=True)
    shapes = {f"{op} {inp}->{oup}@{size} b{b}": (b, oup, size, size)
              for inp, size, ghost_oup in ((8, 7, 12), (4, 5, 6)) for b in (1, 2)
              for op, oup in (("ghost", ghost_oup), ("pointwise", ghost_oup // 2))}
    half = {7: 4, 5: 3}  # the stride-2 output size
    shapes.update({f"ghost+dw s2 {inp}->{oup}@{size} b{b}{suffix}": (b, oup, half[size], half[size])
                   for inp, size, oup in ((8, 7, 12), (4, 5, 6)) for b in (1, 2) for suffix in ("", " 5x5")})
    shapes.update({f"depthwise s2 {inp}@{size} b{b}{suffix}": (b, inp, half[size], half[size])
                   for inp, size in ((8, 7), (4, 5)) for b in (1, 2) for suffix in ("", " 5x5")})
    shapes.update({f"stem 3->16@224 s2 b{b}": (b, 16, 112, 112) for b in (1, 2)})
    assert set(cases) == set(shapes)
    with torch.inference_mode():
        for name, calls in cases.items():  # each case on its own shape (not the last one made)
            assert calls["old"]().shape == shapes[name], name
            assert torch.equal(calls["old"](), calls["new"]())

    ab_libraries.compare(cases, rounds=2, min_time=0.0)  # the same kernels both sides: no difference
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 1 + len(cases) and not any("differ" in line or "not compared" in line for line in lines)
    for line, name in zip(lines[1:], cases):  # each case's times and old / new, in the cases' order
        old_us, new_us, ratio = (float(v) for v in line[len(name):].split()[:3])
        assert line.startswith(name) and old_us > 0 and new_us > 0 and ratio > 0


def test_timm_parity_checks_pass_on_the_stand_in():
    """bench/timm_parity.py's checks (run where timm imports), here on the stand-in in timm's place."""
    import timm_ghostnet
    import timm_parity
    import torch
    from conftest import randomise_bn
    torch.manual_seed(0)
    make = lambda: timm_ghostnet.GhostNet(timm_ghostnet.CFGS, width=0.5, version="v2", drop_rate=0.0)  # noqa: E731
    model = randomise_bn(make(), spread=0.2).eval()
    x = torch.randn(2, 3, 64, 72)
    checks = (timm_parity.eval_checks(model, x) + timm_parity.training_checks(model, x[:, :, :40, :40])
              + timm_parity.stand_in_checks(model, make(), x))
    assert len(checks) == 12 and all(error <= limit for _, error, limit in checks), checks
    other = timm_ghostnet.GhostNet(timm_ghostnet.CFGS, width=0.5, version="v1")
    assert [error for _, error, _ in timm_parity.stand_in_checks(model, other, x)] == [1.0, 1.0]
