"""`--ray`: validation and sweeps on a Ray cluster give exactly the local pipeline's results.

Needs the ray extra (CI runs these in `.venv-ray`, see .ci/run); skipped where ray is not installed.

* a local Ray (`ray.init(num_cpus=2)`) in this process: per-image predictions, top-1/top-5, the paired drop and
  its interval, skipped images — all EQUAL to the local threaded pipeline's; one inference actor killed mid-run
  changes nothing; a sweep through Ray equals the local sweep;
* a two-raylet cluster on this machine (`ray start --head` + `ray start --address`, one CPU each, token auth)
  used by the `rq` command line through `--ray HOST:PORT`: same result, the report names 2 nodes;
* an unreachable `--ray ADDRESS`: one line, exit 2, well within 30 s.

Every Ray started here is stopped by a fixture finalizer (ray.shutdown, or killing exactly the processes the
two-raylet cluster started), so no raylet outlives the tests.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

ray = pytest.importorskip("ray")
pytest.importorskip("ray.data")

from calibration import discover_dataset  # noqa: E402
from calibration.progress import ProgressCallbacks  # noqa: E402
from quantize.distributed import RayRunner  # noqa: E402
from quantize.measure.evaluate import evaluate  # noqa: E402
from quantize.measure.validate import validate, validation_samples  # noqa: E402
from quantize.pipeline import quantize_model  # noqa: E402
from quantize.recipe import QuantRecipe  # noqa: E402
from tests.helpers.calib_images import make_class_folders, write_rgb, write_truncated_jpeg  # noqa: E402
from tests.helpers.cpu import x86_cpu  # noqa: E402
from tests.helpers.onehot import wnid  # noqa: E402
from tests.helpers.tiny_models import SMALL_SPEC  # noqa: E402

pytestmark = pytest.mark.ray

REPO = Path(__file__).resolve().parents[1]
SPEC_ARGS = ["--resize", "36", "--crop", "32"]


def pixel_model(path: Path, seed: int = 7) -> Path:
    """``[N,3,32,32]`` → Conv(4) → Relu → AveragePool 8×8 → Flatten(64) → Gemm(1000), seeded weights: a
    1000-class model whose answer depends on where things are in the image, so the generated images get
    many different predictions (and INT8 disagrees with FP32 on some)."""
    rng = np.random.default_rng(seed)
    inits = [
        numpy_helper.from_array((rng.standard_normal((4, 3, 3, 3)) * 0.5).astype(np.float32), "conv_W"),
        numpy_helper.from_array((rng.standard_normal(4) * 0.1).astype(np.float32), "conv_B"),
        numpy_helper.from_array(rng.standard_normal((1000, 64)).astype(np.float32), "fc_W"),
        numpy_helper.from_array((rng.standard_normal(1000) * 0.1).astype(np.float32), "fc_B"),
    ]
    nodes = [
        helper.make_node("Conv", ["input", "conv_W", "conv_B"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["r"], name="relu"),
        helper.make_node("AveragePool", ["r"], ["p"], name="pool", kernel_shape=[8, 8], strides=[8, 8]),
        helper.make_node("Flatten", ["p"], ["f"], name="flatten", axis=1),
        helper.make_node("Gemm", ["f", "fc_W", "fc_B"], ["logits"], name="fc", transB=1),
    ]
    graph = helper.make_graph(
        nodes,
        "pixels",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, 32, 32])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 1000])],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, Path]:
    """A 1000-class FP32 model, its INT8 version, and a validation folder with one unreadable image."""
    base = tmp_path_factory.mktemp("ray")
    fp32 = pixel_model(base / "fp32.onnx")
    calib = base / "calib"
    make_class_folders(calib, {wnid(0): 4, wnid(1): 4}, size=(48, 40))
    int8 = base / "int8.onnx"
    # Coarse on purpose (per-tensor, v1's op types, no bias correction): the paired statistics compared below
    # need predictions that differ between FP32 and INT8.
    recipe = QuantRecipe(
        samples=8, per_channel=False, op_types=("Conv", "Gemm", "MatMul"), bias_correction=False
    )
    quantize_model(fp32, calib, output=int8, recipe=recipe, spec=SMALL_SPEC, cpu=x86_cpu("avx2"))
    val = base / "val"
    make_class_folders(val, {wnid(2): 12, wnid(5): 12, wnid(9): 11}, size=(48, 40))
    write_truncated_jpeg(val / wnid(5) / "broken.JPEG")
    return {"fp32": fp32, "int8": int8, "calib": calib, "val": val}


@pytest.fixture(scope="module")
def local_ray():
    """Ray on this machine with 2 CPUs, in this process; shut down when the module's tests are done."""
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        yield RayRunner("auto")
    finally:
        ray.shutdown()


def _assert_same_run(a, b) -> None:
    assert a.images == b.images
    assert np.array_equal(a.labels, b.labels)
    assert a.paths == b.paths
    assert a.skipped == b.skipped
    for ma, mb in zip(a.models, b.models, strict=True):
        assert np.array_equal(ma.predictions, mb.predictions)
        assert np.array_equal(ma.correct_top1, mb.correct_top1)
        assert np.array_equal(ma.correct_top5, mb.correct_top5)
        assert (ma.top1, ma.top5) == (mb.top1, mb.top5)


def test_ray_validation_equals_the_local_pipeline(inputs, local_ray):
    dataset, samples = validation_samples(inputs["val"], None, None)
    args = (inputs["fp32"], inputs["int8"], dataset, samples, SMALL_SPEC)
    local = validate(*args, batch_size=4)
    seen = []
    distributed = validate(
        *args, batch_size=4, ray=local_ray, progress=ProgressCallbacks(on_advance=seen.append)
    )
    _assert_same_run(distributed.run, local.run)
    assert distributed.drop == local.drop  # drop, interval, discordant counts: equal, not close
    assert sum(seen) == len(samples)  # the progress bar reaches every image, skipped ones included
    # the model really tells images apart (the equality above is not between two constant answers)
    assert len(set(local.fp32.predictions.tolist())) >= 3
    assert local.drop.disagreements > 0
    # a worker that cannot read an image: counted and named as skipped, like a local run
    assert [p.name for p, _ in distributed.run.skipped] == ["broken.JPEG"]
    cluster = distributed.to_dict()["cluster"]
    assert cluster["nodes"] == 1 and cluster["cpus"] == 2.0
    assert "cluster" not in local.to_dict()


def _descends_from(pid: int, ancestor: int) -> bool:
    while pid > 1:
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            return False
        pid = int(stat.rsplit(")", 1)[1].split()[1])
        if pid == ancestor:
            return True
    return False


def _inference_actor_pids() -> list[int]:
    """This test process's Ray inference actors (Ray names their processes after the actor class)."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
        except OSError:
            continue
        if b"InferenceActor" in cmdline and _descends_from(int(entry), os.getpid()):
            pids.append(int(entry))
    return sorted(pids)


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="finds the actor's process through /proc")
def test_killing_an_inference_actor_mid_run_loses_and_repeats_nothing(inputs, local_ray):
    _dataset, samples = validation_samples(inputs["val"], None, None)
    local = evaluate([inputs["fp32"], inputs["int8"]], samples, SMALL_SPEC, batch_size=2)
    state = {"done": 0, "killed": None, "done_at_kill": None}

    def on_images(n: int) -> None:
        state["done"] += n
        if state["killed"] is None:
            pids = _inference_actor_pids()
            assert pids, "no inference actor process found"
            os.kill(pids[0], signal.SIGKILL)
            state["killed"], state["done_at_kill"] = pids[0], state["done"]

    run = evaluate(
        [inputs["fp32"], inputs["int8"]],
        samples,
        SMALL_SPEC,
        batch_size=2,
        ray=local_ray,
        progress=ProgressCallbacks(on_advance=on_images),
    )
    assert state["killed"] is not None
    assert state["done_at_kill"] < len(samples)  # killed while images were still outstanding
    assert not Path(f"/proc/{state['killed']}").exists() or state["killed"] not in _inference_actor_pids()
    _assert_same_run(run, local)  # every image exactly once (the driver also checks), same answers
    assert state["done"] == len(samples)


def test_ray_sweep_equals_the_local_sweep(inputs, local_ray, tmp_path):
    from quantize.sweep import run_sweep

    common = dict(
        grid="calibration",
        base=QuantRecipe(samples=8, num_bins=128),
        spec=SMALL_SPEC,
        eval_batch=4,
        cpu=x86_cpu("avx2"),
    )
    local = run_sweep(inputs["fp32"], inputs["calib"], inputs["val"], report_dir=tmp_path / "a", **common)
    distributed = run_sweep(
        inputs["fp32"], inputs["calib"], inputs["val"], report_dir=tmp_path / "b", ray=local_ray, **common
    )
    assert np.array_equal(local.fp32_predictions, distributed.fp32_predictions)
    assert [e.recipe for e in local.entries] == [e.recipe for e in distributed.entries]
    for a, b in zip(local.entries, distributed.entries, strict=True):
        assert np.array_equal(a.predictions, b.predictions)
        assert np.array_equal(a.top5_correct, b.top5_correct)
        assert a.quantized_ops == b.quantized_ops
        assert a.model_path.read_bytes() == b.model_path.read_bytes()  # quantized by a Ray task, same bytes
    assert distributed.validation["cluster"]["nodes"] == 1
    # an interrupted cluster sweep resumes from the same per-recipe cache
    again = run_sweep(
        inputs["fp32"], inputs["calib"], inputs["val"], report_dir=tmp_path / "b", ray=local_ray, **common
    )
    assert all(e.cached for e in again.entries)


# -- the command line against a separate cluster (subprocesses: nothing shares this process's Ray) --------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _processes_mentioning(*needles: str) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue
        if any(n in cmdline for n in needles):
            found.append(int(entry))
    return found


def _ray_start(args: list[str], env: dict) -> None:
    done = subprocess.run(args, env=env, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, f"{' '.join(args)}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"


def _stop_cluster(needles: tuple[str, ...]) -> None:
    """Kill exactly the processes of this cluster (never `ray stop`, which would stop every Ray here)."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        pids = _processes_mentioning(*needles)
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.time() + 10
        while pids and time.time() < deadline and _processes_mentioning(*needles):
            time.sleep(0.2)
        if not _processes_mentioning(*needles):
            return


@pytest.fixture(scope="module")
def two_raylets():
    """`ray start --head` plus a second raylet joining it, one CPU each, token auth, on 127.0.0.1."""
    ray_cli = str(Path(sys.executable).parent / "ray")
    temp_dir = tempfile.mkdtemp(prefix="rqray-", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    port = _free_port()
    address = f"127.0.0.1:{port}"
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(16)}
    env.pop("RAY_ADDRESS", None)
    common = ["--node-ip-address", "127.0.0.1", "--num-cpus", "1", "--disable-usage-stats"]
    needles = (temp_dir, f"gcs-address={address}", f"gcs_address={address}", f"--address={address}")
    try:
        _ray_start(
            [
                ray_cli,
                "start",
                "--head",
                "--port",
                str(port),
                "--temp-dir",
                temp_dir,
                "--include-dashboard=false",
                "--dashboard-agent-listen-port",
                str(_free_port()),
                *common,
            ],
            env,
        )
        _ray_start(
            [
                ray_cli,
                "start",
                "--address",
                address,
                "--dashboard-agent-listen-port",
                str(_free_port()),
                *common,
            ],
            env,
        )
        yield {"address": address, "env": env}
    finally:
        _stop_cluster(needles)
        shutil.rmtree(temp_dir, ignore_errors=True)


def _rq(*args, env=None, timeout=300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "quantize.cli", *[str(a) for a in args]],
        cwd=REPO,
        env={**(env or os.environ), "COLUMNS": "200", "NO_COLOR": "1", "RQ_CPU_FLAGS": "avx2"},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_two_raylet_cluster_through_the_command_line(inputs, two_raylets, tmp_path):
    dataset, samples = validation_samples(inputs["val"], None, None)
    local = validate(inputs["fp32"], inputs["int8"], dataset, samples, SMALL_SPEC, batch_size=4)
    # `rq quantize --val --ray ADDRESS` writes the report; the INT8 model is quantized here, validated there.
    out = tmp_path / "int8.onnx"
    result = _rq(
        "quantize", inputs["fp32"], "--calib", inputs["calib"], "--samples", 8, "--per-tensor",
        "--op-types", "Conv,Gemm,MatMul", "--no-bias-correction", "--out", out, "--val", inputs["val"], "--eval-batch", 4, "--ray", two_raylets["address"],
        "--report-dir", tmp_path / "reports", "--json", *SPEC_ARGS,
        env=two_raylets["env"],
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    cluster = report["validation"]["cluster"]
    assert cluster["nodes"] == 2 and cluster["cpus"] == 2.0
    assert out.read_bytes() == inputs["int8"].read_bytes()  # same recipe, same INT8 model
    assert report["validation"]["images"] == local.run.images
    assert [p for p, _ in report["validation"]["skipped"]] == [str(p) for p, _ in local.run.skipped]
    int8 = next(v for v in report["variants"] if v["kind"] == "int8")
    assert int8["drop"] == json.loads(json.dumps(local.drop.to_dict()))
    fp32 = next(v for v in report["variants"] if v["kind"] == "fp32")
    assert fp32["accuracy"]["top1"] == round(local.fp32.top1, 4)
    md = next((tmp_path / "reports").glob("*/report.md")).read_text()
    assert "2 nodes" in md
    # per-image predictions on the cluster, from `rq eval --ray ADDRESS`'s own code path
    script = (
        "import sys, json, numpy as np\n"
        "from tests.helpers.tiny_models import SMALL_SPEC\n"
        "from quantize.distributed import RayRunner\n"
        "from quantize.measure.evaluate import evaluate\n"
        "from quantize.measure.validate import validation_samples\n"
        "_, samples = validation_samples(sys.argv[1], None, None)\n"
        "with RayRunner(sys.argv[2]) as r:\n"
        "    run = evaluate(sys.argv[3:], samples, SMALL_SPEC, batch_size=4, ray=r)\n"
        "print(json.dumps([m.predictions.tolist() for m in run.models] + [run.cluster['nodes']]))\n"
    )
    cmd = [
        sys.executable,
        "-c",
        script,
        inputs["val"],
        two_raylets["address"],
        inputs["fp32"],
        inputs["int8"],
    ]
    env = {**two_raylets["env"], "PYTHONPATH": f"{REPO}{os.pathsep}{REPO / 'tests'}"}
    done = subprocess.run([str(c) for c in cmd], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    *predictions, nodes = json.loads(done.stdout.strip().splitlines()[-1])
    assert nodes == 2
    assert predictions == [m.predictions.tolist() for m in local.run.models]


def test_unreachable_address_is_one_line_exit_2_within_30_s(inputs):
    port = _free_port()  # nothing listens there
    started = time.monotonic()
    result = _rq("eval", inputs["fp32"], "--data", inputs["val"], "--ray", f"127.0.0.1:{port}", *SPEC_ARGS)
    elapsed = time.monotonic() - started
    assert result.returncode == 2, result.stderr
    assert elapsed < 30
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "cannot reach the Ray cluster at 127.0.0.1:" in lines[0], result.stderr
    assert "Traceback" not in result.stderr


def test_flat_ilsvrc_folder_with_val_txt_through_ray(local_ray, inputs, tmp_path):
    """The 50,000-image layout: flat ILSVRC2012_val_*.JPEG files, labels from a full-length val.txt."""
    flat = tmp_path / "val"
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 1000, size=50_000)
    for i in range(1, 25):
        write_rgb(flat / f"ILSVRC2012_val_{i:08d}.JPEG", size=(48, 40), seed=i)
    val_txt = tmp_path / "val.txt"
    val_txt.write_text("".join(f"ILSVRC2012_val_{i:08d}.JPEG {labels[i - 1]}\n" for i in range(1, 50_001)))
    dataset = discover_dataset(flat, val_txt)
    assert dataset.layout == "flat+labels"
    _, samples = validation_samples(flat, val_txt, None)
    assert [s.label for s in samples] == labels[:24].tolist()
    local = evaluate([inputs["fp32"]], samples, SMALL_SPEC, batch_size=5)
    distributed = evaluate([inputs["fp32"]], samples, SMALL_SPEC, batch_size=5, ray=local_ray)
    _assert_same_run(distributed, local)


def test_tuning_through_ray_takes_the_same_steps(local_ray, tmp_path, tmp_path_factory):
    from quantize.tune import TuneRequest
    from tests.helpers.sensitive import (
        PER_TENSOR,
        center_fc_bias,
        colored_images,
        labelled_by_fp32,
        tune_split,
    )
    from tests.helpers.sensitive import sensitive_model as tune_model

    base = tmp_path_factory.mktemp("ray-tune")
    model = tune_model(base / "sensitive.onnx")
    center_fc_bias(model, colored_images(base / "staging", 36))
    labelled_by_fp32(model, base / "val", base / "staging")
    calib = base / "calib"
    colored_images(calib, 16, start=500)
    tune, _confirm = tune_split(base / "val")
    results = []
    for runner in (None, local_ray):
        request = TuneRequest(max_drop_pt=0.0, tune_samples=tuple(tune), bench_runs=0, ray=runner)
        out = tmp_path / f"tuned-{runner is not None}.onnx"
        common = dict(recipe=PER_TENSOR, spec=SMALL_SPEC, cpu=x86_cpu("avx2"), workers=2)
        results.append(quantize_model(model, calib, output=out, tune=request, **common))
    local, distributed = (r.tuning for r in results)
    assert [(s.fallback, s.top1, s.drop_pt, s.agreement_pct) for s in distributed.steps] == [
        (s.fallback, s.top1, s.drop_pt, s.agreement_pct) for s in local.steps
    ]
    assert distributed.fallback_nodes == local.fallback_nodes == ["conv_sensitive"]


def test_connecting_keeps_the_callers_sigterm_handler():
    """ray.init installs its own SIGTERM handler (sys.exit); rq's signal contract must survive a connection."""
    code = (
        "import signal, sys\n"
        "from quantize.distributed import RayRunner\n"
        "mine = lambda *a: None\n"
        "signal.signal(signal.SIGTERM, mine)\n"
        "r = RayRunner('local'); r.connect()\n"
        "kept = signal.getsignal(signal.SIGTERM) is mine\n"
        "r.close()\n"
        "print('kept' if kept else 'replaced')\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=180,
        env={**os.environ},
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "kept"  # without the restore in RayRunner: "replaced"
