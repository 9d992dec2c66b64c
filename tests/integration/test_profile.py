"""harness.analyse.profile: window placement, the breakdown of a (synthetic GPU) trace, the Nsight command
builders and parsers, and ONE short real profiled CPU training run of a tiny model."""
from __future__ import annotations

import gzip
import json

import pytest

from harness.analyse import nsight
from harness.analyse import profile
from harness.analyse.profile import breakdown_from_trace
from harness.child import profiler
from harness.child.profiler import choose_window
from tests._fixtures_report import typed


def test_window_is_steady_and_ends_before_training_ends():
    assert choose_window(300) == (90, 20)
    assert choose_window(20) == (10, 9)
    assert choose_window(14) == (10, 3)
    assert choose_window(8) == (2, 5)
    assert choose_window(2) is None
    for n in range(3, 400):
        s, w = choose_window(n)
        assert s >= 1 and w >= 1 and s + w <= n - 1, n
    assert choose_window(300, start=5, window=3) == (5, 3)
    assert profiler.parse_spec("steady,start=5,window=3") == {"start": 5, "window": 3}
    with pytest.raises(ValueError):
        profiler.parse_spec("bogus")


def _x(name, cat, ts, dur, tid=1, **args):
    return {"ph": "X", "cat": cat, "name": name, "pid": 1, "tid": tid, "ts": ts, "dur": dur, "args": args}


def synthetic_gpu_trace():
    ev = [
        _x("dph::forward", "user_annotation", 0, 100), _x("dph::force", "user_annotation", 60, 30),
        _x("dph::backward", "user_annotation", 100, 100), _x("dph::optimizer", "user_annotation", 200, 20),
        _x("dph::data", "user_annotation", 220, 10),
        _x("aten::mm", "cpu_op", 5, 20),
        _x("cudaLaunchKernel", "cuda_runtime", 10, 1, correlation=1),
        _x("cudaLaunchKernel", "cuda_runtime", 12, 1, correlation=5),
        _x("cudaLaunchKernel", "cuda_runtime", 70, 1, correlation=2),
        _x("cudaLaunchKernel", "cuda_runtime", 150, 1, tid=2, correlation=3),  # autograd engine thread
        _x("cudaLaunchKernel", "cuda_runtime", 205, 1, correlation=4),
        _x("cudaMemcpyAsync", "cuda_runtime", 222, 1, correlation=6),
        _x("void gemm<float>(float*)", "kernel", 20, 20, tid=7, correlation=1),
        _x("void other_kernel()", "kernel", 30, 20, tid=7, correlation=5),  # overlaps: union counts once
        _x("env_mat_kernel", "kernel", 75, 20, tid=7, correlation=2),
        _x("tanh_backward_kernel", "kernel", 160, 30, tid=7, correlation=3),
        _x("multi_tensor_apply_kernel", "kernel", 210, 5, tid=7, correlation=4),
        _x("Memcpy HtoD (Pageable -> Device)", "gpu_memcpy", 225, 3, tid=7, correlation=6, kind="HtoD"),
    ]
    return {"traceEvents": ev}


def test_breakdown_of_a_gpu_trace():
    b = breakdown_from_trace(synthetic_gpu_trace(), steps=2, wall_s=500e-6)
    assert b["wall_s_per_step"] == pytest.approx(250e-6)
    assert b["gpu_busy_s_per_step"] == pytest.approx(88e-6 / 2)  # union of kernel + memcpy intervals
    assert b["host_gap_s_per_step"] == pytest.approx(250e-6 - 44e-6)
    assert b["kernels_per_step"] == 2.5 and b["launches_per_step"] == 2.5
    assert b["memcpy"]["count"] == 1 and b["memcpy"]["time_s"] == pytest.approx(3e-6)
    assert b["memcpy"]["by_kind"] == {"HtoD": 1}
    assert b["top_kernels"][0]["name"] == "tanh_backward_kernel" and len(b["top_kernels"]) == 5
    r = b["categories"]["by_range"]
    assert b["categories"]["basis"] == "gpu_kernel_time"
    # kernels are attributed by their launch time stamp, ranges from any thread
    assert r["force/backward"] == pytest.approx(25e-6)
    assert r["other"] == pytest.approx(20e-6)
    assert r["optimizer"] == pytest.approx(2.5e-6)
    assert r["data"] == pytest.approx(1.5e-6)
    assert sum(r.values()) == pytest.approx(sum(b["categories"]["by_name"].values()))
    n = b["categories"]["by_name"]
    assert n["optimizer"] == pytest.approx(2.5e-6) and n["env-mat/descriptor"] == pytest.approx(10e-6)
    assert b["ranges_host_s_per_step"]["forward"] == pytest.approx(35e-6)  # 100 - 30 (force) over 2 steps


def test_breakdown_of_a_cpu_trace_has_no_gpu_fields():
    ev = [_x("dph::forward", "user_annotation", 0, 100), _x("aten::mm", "cpu_op", 10, 50),
          _x("aten::add", "cpu_op", 20, 10), _x("dph::optimizer", "user_annotation", 100, 10),
          _x("aten::mul_", "cpu_op", 101, 5)]
    b = breakdown_from_trace({"traceEvents": ev}, steps=1, wall_s=0.001)
    assert b["gpu_busy_s_per_step"] is None and b["kernels_per_step"] is None and b["memcpy"] is None
    assert b["categories"]["basis"] == "cpu_op_self_time"
    assert b["top_ops"][0] == {"name": "aten::mm", "self_s": pytest.approx(40e-6), "count": 1,
                               "per_step_s": pytest.approx(40e-6)}
    assert b["categories"]["by_range"]["optimizer"] == pytest.approx(5e-6)
    assert b["categories"]["by_range"]["other"] == pytest.approx(50e-6)


NCU_LONG = '''==PROF== Connected to process 4242 (/usr/bin/python3.12)
==PROF== Profiling "vectorized_elementwise_kernel" - 0: 0%....50%....100% - 1 pass
==PROF== Disconnected from process 4242
"ID","Process ID","Process Name","Host Name","Kernel Name","Context","Stream","Block Size","Grid Size","Device","CC","Section Name","Metric Name","Metric Unit","Metric Value"
"0","4242","python3.12","127.0.0.1","void at::native::vectorized_elementwise_kernel<4, at::native::tanh_kernel_cuda(at::TensorIteratorBase &)::{lambda()#1}, at::detail::Array<char *, 2>>(int, T2, T3)","1","7","(128, 1, 1)","(1024, 1, 1)","0","9.0","Command line profiler metrics","dram__throughput.avg.pct_of_peak_sustained_elapsed","%","61.23"
"0","4242","python3.12","127.0.0.1","void at::native::vectorized_elementwise_kernel<4, at::native::tanh_kernel_cuda(at::TensorIteratorBase &)::{lambda()#1}, at::detail::Array<char *, 2>>(int, T2, T3)","1","7","(128, 1, 1)","(1024, 1, 1)","0","9.0","Command line profiler metrics","gpu__time_duration.sum","nsecond","12,288"
"1","4242","python3.12","127.0.0.1","void at::native::vectorized_elementwise_kernel<4, at::native::tanh_kernel_cuda(at::TensorIteratorBase &)::{lambda()#1}, at::detail::Array<char *, 2>>(int, T2, T3)","1","7","(128, 1, 1)","(1024, 1, 1)","0","9.0","Command line profiler metrics","dram__throughput.avg.pct_of_peak_sustained_elapsed","%","59.23"
"2","4242","python3.12","127.0.0.1","sm90_xmma_gemm_f32f32_tf32f32_f32_nn_n_tilesize128x128x32","1","7","(256, 1, 1)","(66, 1, 1)","0","9.0","Command line profiler metrics","sm__throughput.avg.pct_of_peak_sustained_elapsed","%","77.5"
'''

NCU_RAW = '''==PROF== Disconnected from process 1
"ID","Process ID","Process Name","Host Name","Kernel Name","Context","Stream","Block Size","Grid Size","Device","CC","dram__throughput.avg.pct_of_peak_sustained_elapsed","gpu__time_duration.sum"
"","","","","","","","","","","","%","nsecond"
"0","1","python","h","k1","1","7","(128, 1, 1)","(8, 1, 1)","0","9.0","10.5","1,024"
"1","1","python","h","k1","1","7","(128, 1, 1)","(8, 1, 1)","0","9.0","20.5","2,048"
"2","1","python","h","k2","1","7","(128, 1, 1)","(8, 1, 1)","0","9.0","5","100"
'''


def test_parse_ncu_csv_long_and_raw():
    k = nsight.parse_ncu_csv(NCU_LONG)
    assert len(k) == 2
    assert k[0]["name"].startswith("void at::native::vectorized_elementwise_kernel<4,")
    assert k[1]["name"] == "sm90_xmma_gemm_f32f32_tf32f32_f32_nn_n_tilesize128x128x32"
    assert k[0]["metrics"]["dram__throughput.avg.pct_of_peak_sustained_elapsed"] == pytest.approx(60.23)
    assert k[0]["metrics"]["gpu__time_duration.sum"] == 12288
    assert k[0]["launches"] == 2
    r = nsight.parse_ncu_csv(NCU_RAW)
    assert [x["name"] for x in r] == ["k1", "k2"]
    assert r[0]["metrics"]["gpu__time_duration.sum"] == pytest.approx(1536) and r[0]["launches"] == 2
    assert nsight.parse_ncu_csv("==PROF== nothing profiled\n") == []


def test_nsight_commands_and_nsys_parser(tmp_path):
    cmd = ["python", "-m", "harness.child.launch", "--tree", "T", "--", "--pt", "train", "input.json"]
    n = nsight.nsys_command(tmp_path / "nsys", cmd)
    assert n[:2] == ["nsys", "profile"] and n[-len(cmd):] == cmd and "--trace=cuda,nvtx,osrt" in n
    assert nsight.nsys_stats_command(tmp_path / "x.nsys-rep")[:2] == ["nsys", "stats"]
    assert nsight.kernel_base_name("void at::native::vectorized_elementwise_kernel<4, X>(int, T2)") == \
        "vectorized_elementwise_kernel"
    assert nsight.kernel_base_name("sm90_xmma_gemm_nn") == "sm90_xmma_gemm_nn"
    c = nsight.ncu_command(["void at::native::foo<1>(int)", "bar_kernel"], cmd, launch_skip=50)
    assert c[0] == "ncu" and "--csv" in c and c[-len(cmd):] == cmd
    assert c[c.index("--kernel-name") + 1] == "regex:^(bar_kernel|foo)$"
    assert c[c.index("--launch-skip") + 1] == "50" and c[c.index("--launch-count") + 1] == "2"
    assert c[c.index("--target-processes") + 1] == "application-only" and c[c.index("--print-units") + 1] == "base"
    text = ("Processing [x.sqlite] with [cuda_gpu_kern_sum.py]...\n"
            "Time (%),Total Time (ns),Instances,Avg (ns),Med (ns),Min (ns),Max (ns),StdDev (ns),Name\n"
            "60.0,6000,3,2000.0,2000.0,1900,2100,100.0,gemm_kernel\n"
            "40.0,4000,8,500.0,500.0,400,600,50.0,\"void at::native::foo<int, 2>(int)\"\n")
    rows = nsight.parse_nsys_kern_sum(text)
    assert rows[0] == {"name": "gemm_kernel", "pct": 60.0, "total_s": pytest.approx(6e-6), "count": 3}
    assert rows[1]["name"] == "void at::native::foo<int, 2>(int)"


def test_summarise_absent_and_present(tmp_path):
    assert profile.summarise(tmp_path) is None
    (tmp_path / "profile.json").write_text(json.dumps({"status": "ok", "steps": 3}))
    assert profile.summarise(tmp_path) == {"status": "ok", "steps": 3}


def test_format_breakdown_handles_missing_profiles():
    b = breakdown_from_trace(synthetic_gpu_trace(), steps=2, wall_s=500e-6)
    b.update(status="ok", window={"start_step": 90, "steps": 2})
    text = profile.format_breakdown(typed([{"variant": "baseline", "profile": b, "status": "ok"},
                                           {"variant": "fp32", "profile": None, "status": "failed"}]))
    assert "force/backward" in text and "tanh_backward_kernel" in text and "no profile" in text


@pytest.fixture(scope="module")
def profiled_run(tmp_path_factory):
    from harness.run import bench
    from harness.results import regression
    from harness.prepare import systems

    if systems.checksum_problems(systems.load_system("water")):
        pytest.skip("water data absent (make systems): the real profiled run needs a few of its frames")
    tmp = tmp_path_factory.mktemp("prof")
    sd = regression.make_tiny_system(tmp / "system")
    req = bench.BenchRequest(system=str(sd), variants=["baseline"], steps=14, device="cpu", accuracy=False,
                             profile=True, runs_dir=tmp / "runs", work_root=tmp / "work")
    (row,) = bench.run(req, log=lambda m: None)
    return row


def test_real_profiled_cpu_run(profiled_run):
    row = profiled_run
    assert row.status == "ok", row.error
    p = row.profile.to_dict()
    assert p and p["status"] == "ok" and p["device"] == "cpu"
    w = p["window"]
    assert w == {"start_step": 10, "steps": 3, "numb_steps": 14}
    assert w["start_step"] + w["steps"] <= w["numb_steps"] - 1  # closed before training ended
    assert len(json.loads(open(f"{row.artifacts.work_dir}/steps.json").read())["step_s"]) >= 13
    wd = row.artifacts.work_dir
    trace = json.loads(gzip.open(f"{wd}/{profile.TRACE}").read())
    names = {e.get("name") for e in trace["traceEvents"]}
    for r in ("data", "forward", "descriptor", "embedding", "fitting", "force", "backward", "optimizer"):
        assert profile.RANGE_PREFIX + r in names, r
        assert p["ranges_host_s_per_step"][r] > 0, r
    assert any(m.endswith(":descriptor") for m in p["wrapped_modules"])
    assert p["gpu_busy_s_per_step"] is None and p["top_kernels"] == [] and len(p["top_ops"]) == 15
    cats = p["categories"]["by_range"]
    assert cats["force/backward"] > 0 and cats["embedding"] > 0 and cats["optimizer"] > 0
    assert 0 < sum(cats.values()) <= p["wall_s_per_step"] * 1.05
    assert profile.summarise(wd) == p
    # monkeypatches are gone after the window: the results record has the same profile as the file
    assert json.loads(open(row.path).read())["profile"] == p


NCU_UNITS = '''"ID","Process ID","Process Name","Host Name","Kernel Name","Context","Stream","Block Size","Grid Size","Device","CC","dram__bytes.sum.per_second","dram__throughput.avg.pct_of_peak_sustained_elapsed","gpu__time_duration.sum","sm__sass_thread_inst_executed_op_dadd_pred_on.sum","sm__sass_thread_inst_executed_op_dfma_pred_on.sum","sm__sass_thread_inst_executed_op_dmul_pred_on.sum","sm__throughput.avg.pct_of_peak_sustained_elapsed"
"","","","","","","","","","","","Gbyte/second","%","usecond","inst","inst","inst","%"
"0","1","python","h","triton_poi_fused_0","1","7","(128, 1, 1)","(8, 1, 1)","0","9.0","1,200","36","2","1000","2000","500","12.5"
'''


def test_ncu_figures_convert_units_and_count_fp64_flops():
    """ncu's scaled units are brought to base ones: 1200 GB/s, 2 us; FP64 FLOPs = dadd + dmul +
    2 dfma = 5500 in 2 us = 2.75 GFLOP/s."""
    (k,) = nsight.parse_ncu_csv(NCU_UNITS)
    assert k["units"]["dram__bytes.sum.per_second"] == "Gbyte/second"
    f = nsight.ncu_figures(k)
    assert f["time_us"] == pytest.approx(2.0) and f["dram_gb_s"] == pytest.approx(1200.0)
    assert f["fp64_gflop_s"] == pytest.approx(5500 / 2e-6 / 1e9)
    assert f["sm_pct"] == pytest.approx(12.5) and f["dram_pct"] == pytest.approx(36.0)
    # without a units row, time counters are nanoseconds and other figures absent
    (r,) = [x for x in nsight.parse_ncu_csv(NCU_RAW) if x["name"] == "k2"]
    g = nsight.ncu_figures(r)
    assert g["time_us"] == pytest.approx(0.1) and g["fp64_gflop_s"] is None and g["dram_gb_s"] is None
    assert f["fp64_pct"] is None  # no card named: no datasheet peak
    # on an H200 (33.5 TFLOP/s FP64 on the CUDA cores) 2.75 GFLOP/s is 0.0082 % of peak
    assert nsight.ncu_figures(k, "NVIDIA H200")["fp64_pct"] == pytest.approx(100 * 2.75e9 / 33.5e12)
    assert nsight.card_peaks("NVIDIA H100 PCIe")[0] == 25.6e12 and nsight.card_peaks("NVIDIA H100 80GB HBM3")[1] == 3.35e12
    assert nsight.card_peaks("Tesla T4") is None
    table = nsight.format_ncu(typed([{"variant": "fused", "environment": {"gpu_name": "NVIDIA H200"},
                                       "profile": {"ncu": {"kernels": [k], "error": None}}}]))
    assert "triton_poi_fused_0" in table and "1200.0" in table and "FP64 %pk" in table and "0.0" in table


# what ncu 2025 on an H200 printed with --page raw --print-units base (shortened): short unit
# names ('ns', 'byte/s') and, besides the metrics asked for, the device's attributes
NCU_RAW_SHORT_UNITS = '''"ID","Process ID","Process Name","Host Name","Kernel Name","Context","Stream","Block Size","Grid Size","Device","CC","device__attribute_warp_size","dram__bytes.sum.per_second","gpu__time_duration.sum","gpu__time_duration.avg","sm__throughput.avg.pct_of_peak_sustained_elapsed"
"","","","","","","","","","","","","byte/s","ns","ns","%"
"0","1","python","h","sort_8_1","1","14","(260, 1, 1)","(288, 1, 1)","0","9.0","32","22250136697.95","108784","108784","13.8"
'''


def test_ncu_short_base_units_and_only_the_asked_metrics():
    """'ns' is nanoseconds, not seconds (read as seconds, a 109 us sort came out as 1.1e11 us),
    and a record keeps the metrics asked for, not ncu's ~200 device attributes."""
    (k,) = nsight.parse_ncu_csv(NCU_RAW_SHORT_UNITS, keep=nsight.NCU_METRICS)
    assert set(k["metrics"]) == {"dram__bytes.sum.per_second", "gpu__time_duration.sum",
                                 "sm__throughput.avg.pct_of_peak_sustained_elapsed"}
    f = nsight.ncu_figures(k, "NVIDIA H200")
    assert f["time_us"] == pytest.approx(108.784) and f["dram_gb_s"] == pytest.approx(22.25, rel=1e-3)
    assert "device__attribute_warp_size" in nsight.parse_ncu_csv(NCU_RAW_SHORT_UNITS)[0]["metrics"]
    for unit, v in [("ns", 1e-9), ("us", 1e-6), ("msecond", 1e-3), ("s", 1.0), ("GB/s", 1e9),
                    ("Kbyte", 1e3), ("%", 1.0), ("pass", 1.0), ("inst", 1.0), ("cycle/nsecond", 1.0)]:
        assert nsight._in_base_units(1.0, unit) == pytest.approx(v), unit


class _FakeChild:
    """subprocess.Popen stand-in for the training child (under ncu): prints `out` to its log,
    then exits 0, or runs until it is killed (hang=True)."""

    def __init__(self, seen: dict, out: str, hang: bool = False):
        self.seen, self.out, self.hang = seen, out, hang

    def __call__(self, cmd, cwd, env, stdout, **kw):
        self.seen.update(cmd=cmd, env=env)
        stdout.write(self.out)
        stdout.flush()
        self.pid, self.returncode, self.killed = 0, None, False
        return self

    def poll(self):
        if not self.hang or self.killed:
            self.returncode = -9 if self.killed else 0
        return self.returncode

    def wait(self, timeout=None):
        return self.poll()


def _profiled_record(tmp_path, monkeypatch, profile_dict: dict, child: _FakeChild):
    """A profiled run's record (work dir under tmp_path, a variant that needs no build) and a fake
    training child: what the pipeline's ncu run (bench.measure_ncu) plans, launches and reads."""
    import types

    from harness.core.records import BuiltVariant, RunRecord, RunSpec, System, Timing, TrainResult
    from harness.run import train

    wd = tmp_path / "work" / "r1"
    wd.mkdir(parents=True)
    system = System(name="w", directory=tmp_path, type_map=("O", "H"), atoms_per_frame=3, train=(tmp_path,),
                    validation=(tmp_path,), input={"training": {"numb_steps": 100, "training_data": {}}}, spec={})
    v = BuiltVariant(name="fused", chain=("baseline", "fused"), hash="h", tree=tmp_path, backend="pt", env={},
                     overrides={}, modules=(), accuracy_class="float64", description="", cached=True, log=())
    spec = RunSpec(run_id="r1", sweep_id="s", system=system, variant=v, steps=100, device="cuda", seed=1,
                   work_dir=wd, profile=True)
    tr = TrainResult(status="ok", error=None, step_s=[], clock="host", startup_s=None, wall_s=1.0,
                     gpu_peak_bytes=None, work_dir=wd, checkpoint=None, lcurve=None, input_path=wd / "input.json",
                     log_path=wd / "train.log")
    monkeypatch.setattr(train, "backend_missing", lambda b: None)
    monkeypatch.setattr(train.subprocess, "Popen", child)
    now = [0.0]  # the child's clock: time passes by its poll interval only
    monkeypatch.setattr(train, "time", types.SimpleNamespace(perf_counter=lambda: now[0], monotonic=lambda: now[0],
                                                             sleep=lambda s: now.__setitem__(0, now[0] + s)))
    monkeypatch.setattr(train.os, "killpg", lambda pid, sig: setattr(child, "killed", True))
    real = train.run_training

    def run_training(spec, progress=None):
        child.seen["timeout"] = spec.timeout_s
        return real(spec, progress)

    monkeypatch.setattr(train, "run_training", run_training)
    return wd, RunRecord(run=spec, train=tr, timing=Timing(), environment={}, profile=profile_dict)



def _fake_ncu_help(monkeypatch, help_text: str) -> None:
    """Only `ncu --help` may run (it answers help_text): the profiled child is faked elsewhere."""
    import types

    def fake_run(cmd, **kw):
        if cmd == ["ncu", "--help"]:
            return types.SimpleNamespace(stdout=help_text, stderr="")
        raise AssertionError(f"ran {cmd}")

    monkeypatch.setattr(nsight.subprocess, "run", fake_run)

def test_ncu_without_per_launch_config_skips_a_couple_of_steps_of_all_kernels(tmp_path, monkeypatch):
    """An old ncu counts launches of all matched kernels together: the skip is two steps' worth
    of all of them (not the window's start: graph capture and compile steps launch fewer, and a
    skip past the last launch measured nothing), the count about one step's worth; the run
    under ncu trains to just past the profiled window's start."""
    from harness.run import bench

    seen = {}

    _fake_ncu_help(monkeypatch, "--launch-skip --launch-count")
    wd, rec = _profiled_record(tmp_path, monkeypatch, {
        "steps": 20, "window": {"start_step": 30},
        "top_kernels": [{"name": "memcpy32_post", "count": 900}, {"name": "sort_8_1", "count": 20}]},
        _FakeChild(seen, NCU_RAW_SHORT_UNITS))
    bench.measure_ncu(rec, 2, 420.0, lambda m: None)
    c = seen["cmd"]
    assert "--filter-mode" not in c
    assert c[c.index("--launch-skip") + 1] == "92"   # 2 steps x (45 + 1) launches
    # one step's worth (46) capped at NCU_MAX_LAUNCHES: 20 for each of the 2 kernels
    assert c[c.index("--launch-count") + 1] == "40"
    assert json.loads((wd / "ncu" / "input.json").read_text())["training"]["numb_steps"] == 32
    d = json.loads((wd / "ncu.json").read_text())
    assert d["error"] is None and d["kernels"][0]["figures"]["time_us"] == pytest.approx(108.784)


def test_ncu_run_that_times_out_is_recorded_with_its_reason(tmp_path, monkeypatch):
    """A lane limit must not leave a silently missing figure: an ncu run past its limit writes
    ncu.json and the run record with error 'ncu timed out', whatever it measured before."""
    from harness.results import runs as results
    from harness.run import bench

    seen = {}

    _fake_ncu_help(monkeypatch, "--filter-mode  global, per-gpu, per-launch-config")
    wd, rec = _profiled_record(tmp_path, monkeypatch, {
        "steps": 10, "window": {"start_step": 5}, "top_kernels": [{"name": "triton_poi_fused_0", "count": 20}]},
        _FakeChild(seen, NCU_UNITS, hang=True))
    logs = []
    bench.measure_ncu(rec, 1, 7, logs.append)
    rec_path = results.write_run(rec, tmp_path / "runs")
    assert seen["timeout"] == 7 and seen["env"]["TORCHINDUCTOR_COMPILE_THREADS"] == "1"
    c = seen["cmd"]  # each kernel configuration measured once, after its first two launches
    assert c[c.index("--filter-mode") + 1] == "per-launch-config"
    assert c[c.index("--launch-skip") + 1] == "2" and c[c.index("--launch-count") + 1] == "1"
    d = json.loads((wd / "ncu.json").read_text())
    assert d["error"] == "ncu timed out after 7 s" and d["returncode"] is None
    assert d["kernels"][0]["figures"]["dram_gb_s"] == pytest.approx(1200.0)
    assert json.loads(rec_path.read_text())["profile"]["ncu"]["error"] == "ncu timed out after 7 s"
    assert any("timed out" in m for m in logs)


def _jax_gpu_trace() -> dict:
    """A jax.profiler trace of 2 steps shaped as XLA writes it on a GPU: a host process (Python
    tracer frames, PjRt dispatch, one launch API call) and a device process whose stream line
    holds the kernels and copies, redrawn per HLO op on the derived 'XLA Ops' line."""
    m = lambda pid, name, tid=None, what="thread_name": {  # noqa: E731
        "ph": "M", "pid": pid, "name": what, "args": {"name": name}, **({"tid": tid} if tid else {})}
    x = lambda pid, tid, name, ts, dur, **args: {  # noqa: E731
        "ph": "X", "pid": pid, "tid": tid, "name": name, "ts": ts, "dur": dur, **({"args": args} if args else {})}
    return {"traceEvents": [
        m(1, "/host:CPU", what="process_name"), m(1, "python", 10),
        m(2, "/device:GPU:0 (NVIDIA H200)", what="process_name"), m(2, "Stream #13(Compute)", 20),
        m(2, "XLA Ops", 21),
        x(1, 10, "$trainer.py:80 train_step", 0, 1000), x(1, 10, "PjitFunction(train_step)", 5, 900),
        x(1, 10, "cuLaunchKernel", 10, 5, correlation_id=7),
        x(2, 20, "loop_fusion", 100, 40, correlation_id=7), x(2, 20, "gemm_fusion", 150, 60),
        x(2, 20, "MemcpyH2D", 300, 10), x(2, 20, "loop_fusion", 1100, 40),
        x(2, 21, "fusion.3 = f64[...] fusion(...)", 100, 200),
    ]}


def test_jax_trace_is_read_with_torch_categories():
    """Kernels are counted once, from the stream line (the XLA Ops line redraws them), Python
    frames are dropped, the launch API call is a launch, PjRt dispatch a host op."""
    ev = profile.jax_trace_events(_jax_gpu_trace())
    cats = sorted((e["cat"], e["name"]) for e in ev)
    assert cats == [("cpu_op", "PjitFunction(train_step)"), ("cuda_driver", "cuLaunchKernel"),
                    ("gpu_memcpy", "MemcpyH2D"), ("kernel", "gemm_fusion"), ("kernel", "loop_fusion"),
                    ("kernel", "loop_fusion")]
    b = breakdown_from_trace({"traceEvents": ev}, steps=2, wall_s=4e-3)
    assert b["kernels_per_step"] == 1.5 and b["launches_per_step"] == 0.5
    assert b["gpu_busy_s_per_step"] == pytest.approx((40 + 60 + 10 + 40) * 1e-6 / 2)
    assert b["top_kernels"][0]["name"] == "loop_fusion" and b["top_kernels"][0]["count"] == 2
    assert [o["name"] for o in b["top_ops"]] == ["PjitFunction(train_step)"]
    # a device with no "Stream" line: every line but the derived per-op ones
    t = _jax_gpu_trace()
    t["traceEvents"][3]["args"]["name"] = "Compute"
    assert sum(e["cat"] == "kernel" for e in profile.jax_trace_events(t)) == 3


def test_tf_backend_profile_says_it_is_not_profiled(tmp_path):
    (tmp_path / "input.json").write_text(json.dumps({"training": {"numb_steps": 40}}))
    clock = type("Clock", (), {"on_tick": []})()
    profiler.install_in_process(clock, tmp_path, "steady", backend="tf")
    d = json.loads((tmp_path / profile.PROFILE_JSON).read_text())
    assert d["status"] == "unsupported" and "tf backend" in d["reason"] and clock.on_tick == []


@pytest.mark.slow
def test_real_profiled_jax_cpu_run(tiny_system, tmp_path):
    """jax-tos under `profile`: jax.profiler traces the steady window; on a CPU, XLA's host work
    (dispatch, CPU fusions) is the breakdown, and no GPU field is invented."""
    from harness.run import bench
    from harness.run import train

    if train.backend_missing("jax"):
        pytest.skip("JAX is not installed (pip install -r harness/pins/jax.txt)")
    req = bench.BenchRequest(system=str(tiny_system), variants=["jax-tos"], steps=14, device="cpu",
                             accuracy=False, profile=True, runs_dir=tmp_path / "runs",
                             work_root=tmp_path / "work")
    (row,) = bench.run(req, log=lambda m: None)
    assert row.status == "ok", row.error
    p = row.profile.to_dict()
    assert p["status"] == "ok" and p["profiler"] == "jax.profiler" and p["device"] == "cpu", p
    assert p["window"]["steps"] == 3 and p["gpu_busy_s_per_step"] is None and p["top_kernels"] == []
    assert p["top_ops"] and p["cpu_ops_per_step"] > 0 and p["xla_executions_per_step"] >= 1
    assert not any(o["name"].startswith("$") for o in p["top_ops"])
    wd = row.artifacts.work_dir
    trace = json.loads(gzip.open(f"{wd}/{profile.TRACE}").read())
    assert {e.get("cat") for e in trace["traceEvents"] if e.get("ph") == "X"} == {"cpu_op"}
    assert not (tmp_path / "work" / profile.JAX_TRACE_DIR).exists()


def test_a_profiler_that_fails_to_start_is_recorded_not_silent(tmp_path, monkeypatch):
    """Training goes on, and profile.json says why there is no profile (e.g. no CUPTI for XLA)."""
    (tmp_path / "input.json").write_text(json.dumps({"training": {"numb_steps": 40}}))
    clock = type("Clock", (), {"on_tick": []})()
    profiler.install_in_process(clock, tmp_path, "steady", backend="jax")

    def no_profiler(self):
        raise RuntimeError("CUPTI not found")

    monkeypatch.setattr(profiler._Session, "_start_jax", no_profiler)
    (tick,) = clock.on_tick
    for i in range(40):
        tick(i)
    d = json.loads((tmp_path / profile.PROFILE_JSON).read_text())
    assert d == {"status": "failed", "reason": "profiler: RuntimeError: CUPTI not found"}
