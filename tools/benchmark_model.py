"""Benchmarks model training and inference speed on this machine; prints one JSON line.

    python tools/benchmark_model.py                      # U-Net and U-T&T, all configurations
    python tools/benchmark_model.py --models=unet --steps=3

Measured (random data, after warm-up steps that include tracing/compilation):

* ``train_steps_per_s``: Keras ``train_on_batch`` (SGD, cross-entropy on every
  output) at ``--train_batch`` (2) images of ``--size`` (512) x 512 x 5;
* ``infer_images_per_s``: ``predict_on_batch`` at ``--infer_batch`` (4) images, of
  the inference model that ``flair_tf.evaluate`` / ``predict`` / ``export`` load:
  BatchNorm folded into the convolutions (`flair_tf.models.folding`;
  ``--nofold_batchnorm`` times the model as trained), then, as evaluate and
  predict load it on a machine without GPU or TPU, the wide 3x3 convolutions
  computed by Winograd F(4x4, 3x3) (`flair_tf.models.winograd`;
  ``--nowinograd``: direct);
* for U-T&T the Sentinel-2 input is 12 monthly dates of 40 x 40 x 10.

Our models run under every combination of oneDNN (``TF_ENABLE_ONEDNN_OPTS``
0/1, it must be set before TensorFlow starts, hence one subprocess per
configuration) and XLA (``jit_compile`` False/True), and optionally under
other dtype policies (``--policies=float32,mixed_bfloat16``); the best is
reported next to each one. When torch and segmentation-models-pytorch are installed,
``smp.Unet('resnet34')`` is timed the same way (``torch.set_num_threads
(--torch_threads)``, NCHW and channels-last. ``ratio_*_sequential`` = ours
(best) / PyTorch (best) from those separate runs. Because this machine's speed
drifts with other tenants' load, the reported ``ratio_train`` / ``ratio_infer``
come from a head-to-head: ours (best float32 configuration) and PyTorch (best
layout) stay loaded in two processes and are timed alternately for
``--rounds`` rounds; the ratio is the median of the per-round ratios. With
``--policies`` including ``mixed_bfloat16``, ``head_to_head_bfloat16`` does the
same for our mixed_bfloat16 against ``torch.autocast('cpu', torch.bfloat16)``.
U-T&T is run with the configuration that was best for U-Net.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import statistics
import subprocess
import sys
import time

from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_list("models", ["unet", "utt"], "Models to time: unet, utt.")
flags.DEFINE_integer("size", 512, "Aerial patch side.")
flags.DEFINE_integer("train_batch", 2, "Training batch size.")
flags.DEFINE_integer("infer_batch", 4, "Inference batch size.")
flags.DEFINE_integer("steps", 5, "Timed steps per measurement.")
flags.DEFINE_integer("warmup", 2, "Untimed steps before timing (tracing, XLA compilation).")
flags.DEFINE_integer("torch_threads", 2, "torch.set_num_threads for the PyTorch baseline.")
flags.DEFINE_integer("num_dates", 12, "Sentinel-2 dates for U-T&T.")
flags.DEFINE_list("policies", ["float32"], "Keras dtype policies to time (e.g. float32,mixed_bfloat16); the "
                  "PyTorch ratio uses float32 only.")
flags.DEFINE_list("configs", [], "Restrict to these oneDNN/XLA configurations (e.g. onednn1_xla0); default all.")
flags.DEFINE_bool("torch", True, "Also time smp's U-Net in PyTorch when installed.")
flags.DEFINE_bool("fold_batchnorm", True, "Time our inference on the model with its BatchNorm folded into the "
                  "convolutions, as flair_tf.evaluate/predict/export run it (models.folding); False: as trained.")
flags.DEFINE_bool("winograd", True, "After folding, compute the wide 3x3 convolutions by Winograd F(4x4, 3x3) "
                  "(models.winograd) where no GPU or TPU is visible, as flair_tf.evaluate/predict run them; False: "
                  "direct convolutions.")
flags.DEFINE_integer("rounds", 5, "Head-to-head rounds (ours, then PyTorch, alternated); 0 skips it.")
flags.DEFINE_string("_worker", None, "Internal: run one measurement (JSON spec) and print its JSON.")
flags.DEFINE_string("_serve", None, "Internal: persistent worker of the head-to-head (JSON spec).")


def _rate(fn, n, warmup):
    for _ in range(warmup):
        fn()
    start = time.perf_counter()
    for _ in range(n):
        fn()
    return n / (time.perf_counter() - start)


def _keras_worker(spec):
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import keras  # noqa: PLC0415
    import numpy as np  # noqa: PLC0415

    from flair_tf.models import build_model  # noqa: PLC0415
    from flair_tf.inference import model_io  # noqa: PLC0415
    from flair_tf.training import optimizers  # noqa: PLC0415

    keras.mixed_precision.set_global_policy(spec.get("policy", "float32"))
    size, arch = spec["size"], spec["arch"]
    config = {"arch": arch, "input_size": size}
    if arch == "utt":
        config["num_dates"] = spec["num_dates"]
    model = build_model(config)
    losses = {k: keras.losses.SparseCategoricalCrossentropy(from_logits=True) for k in model.output}
    # The SGD `flair_tf.train` uses (Keras's, with fused updates), as torch.optim.SGD below.
    model.compile(optimizer=optimizers.SGD(0.01), loss=losses, jit_compile=spec["jit"])
    rng = np.random.RandomState(0)

    def batch(b):
        x = {"aerial": rng.randint(0, 256, (b, size, size, 5)).astype(np.uint8)}
        if arch == "utt":
            t = spec["num_dates"]
            x.update(sentinel=rng.rand(b, t, 40, 40, 10).astype(np.float32) * 3000,
                     sentinel_dates=np.tile(np.arange(t, dtype=np.float32) * 30 - 135, (b, 1)),
                     sentinel_pad_mask=np.zeros((b, t), bool))
        return x

    xt = batch(spec["train_batch"])
    yt = {k: rng.randint(0, 13, (spec["train_batch"], size, size)) for k in model.output}
    xi = batch(spec["infer_batch"])
    infer = model
    if spec.get("fold", True):
        # The inference model flair_tf.evaluate / predict / export run (model_io.load_model).
        # Winograd only where load_model would use it, and on float32 layers only (a no-op under
        # mixed_bfloat16).
        infer = model_io.inference_model(model, winograd=None if spec.get("winograd", True) else False)
        infer.compile(jit_compile=spec["jit"])
    return (lambda: model.train_on_batch(xt, yt)), (lambda: infer.predict_on_batch(xi))


def _torch_worker(spec):
    import torch  # noqa: PLC0415
    import segmentation_models_pytorch as smp  # noqa: PLC0415

    torch.set_num_threads(spec["torch_threads"])
    torch.manual_seed(0)
    fmt = torch.channels_last if spec["channels_last"] else torch.contiguous_format
    model = smp.Unet("resnet34", encoder_weights=None, in_channels=5, classes=13).to(memory_format=fmt)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    loss_fn = torch.nn.CrossEntropyLoss()
    size = spec["size"]
    xt = (torch.randint(0, 256, (spec["train_batch"], 5, size, size)).float() / 255).to(memory_format=fmt)
    yt = torch.randint(0, 13, (spec["train_batch"], size, size))
    xi = (torch.randint(0, 256, (spec["infer_batch"], 5, size, size)).float() / 255).to(memory_format=fmt)

    # bfloat16 autocast: PyTorch's counterpart of Keras's mixed_bfloat16 policy.
    autocast = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if spec.get("bf16") else contextlib.nullcontext

    def train_step():
        model.train()
        opt.zero_grad()
        with autocast():
            logits = model(xt)
        loss_fn(logits.float(), yt).backward()
        opt.step()

    def infer_step():
        model.eval()
        with torch.no_grad(), autocast():
            model(xi)

    return train_step, infer_step


def _steps(spec):
    """(train step, inference step) of the spec's framework."""
    return (_torch_worker if spec["framework"] == "torch" else _keras_worker)(spec)


def _measure(spec):
    """One-shot worker: warm-up, then the timed rates."""
    train_step, infer_step = _steps(spec)
    train = _rate(train_step, spec["steps"], spec["warmup"])
    infer = _rate(infer_step, spec["steps"], spec["warmup"]) * spec["infer_batch"]
    return {"train_steps_per_s": round(train, 4), "infer_images_per_s": round(infer, 4)}


def _serve(spec):
    """Persistent worker for the head-to-head: warm up, then time on request.

    Reads ``train`` / ``infer`` lines on stdin and answers each with one JSON
    rate on stdout, so that the parent can alternate two frameworks round by
    round and compare measurements taken seconds apart.
    """
    steps = dict(zip(("train", "infer"), _steps(spec)))
    for fn in steps.values():
        for _ in range(spec["warmup"]):
            fn()
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        what = line.strip()
        if what not in steps:
            break
        rate = _rate(steps[what], spec["steps"], 0) * (spec["infer_batch"] if what == "infer" else 1)
        print(json.dumps({what: round(rate, 4)}), flush=True)


def _head_to_head(ours_spec, ours_env, torch_spec, rounds):
    """Alternates ours and PyTorch, ``rounds`` times, train then inference.

    Both models stay loaded in two idle processes; each round times ours then
    PyTorch back to back, so a change in the machine's load hits both. The
    ratio is the median of the per-round ratios.
    """
    procs = {}
    for name, spec, env in (("ours", ours_spec, ours_env), ("torch", torch_spec, {})):
        cmd = [sys.executable, os.path.abspath(__file__), f"--_serve={json.dumps(spec)}"]
        procs[name] = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                       stderr=subprocess.DEVNULL, env=dict(os.environ, **env))
    try:
        for name, proc in procs.items():
            line = proc.stdout.readline()
            if not line:
                return {"error": f"{name} worker exited before warming up (exit {proc.wait()})"}
        out = {"rounds": rounds}
        for what, key in (("train", "train_steps_per_s"), ("infer", "infer_images_per_s")):
            rates = {"ours": [], "torch": []}
            for _ in range(rounds):
                for name, proc in procs.items():
                    proc.stdin.write(what + "\n")
                    proc.stdin.flush()
                    rates[name].append(json.loads(proc.stdout.readline())[what])
            out[key] = rates
            out[f"ratio_{what}"] = round(statistics.median(o / t for o, t in zip(rates["ours"], rates["torch"])), 3)
        return out
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.stdin.close()
                proc.wait()


def _run_worker(spec, env_update):
    env = dict(os.environ, **env_update)
    cmd = [sys.executable, os.path.abspath(__file__), f"--_worker={json.dumps(spec)}"]
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if proc.returncode != 0:
        return {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"exit {proc.returncode}"}
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["wall_s"] = round(time.perf_counter() - start, 1)
    return result


def _best(results, key):
    ok = {name: r for name, r in results.items() if key in r}
    return max(ok, key=lambda n: ok[n][key]) if ok else None


def main(argv):
    del argv
    if FLAGS._worker:
        print(json.dumps(_measure(json.loads(FLAGS._worker))))
        return
    if FLAGS._serve:
        _serve(json.loads(FLAGS._serve))
        return
    common = {"size": FLAGS.size, "train_batch": FLAGS.train_batch, "infer_batch": FLAGS.infer_batch,
              "steps": FLAGS.steps, "warmup": FLAGS.warmup, "num_dates": FLAGS.num_dates,
              "fold": FLAGS.fold_batchnorm, "winograd": FLAGS.winograd and FLAGS.fold_batchnorm}
    report = {"benchmark": "models", "machine": platform.processor() or platform.machine(),
              "cpu_count": os.cpu_count(), "load_avg_start": os.getloadavg(), **common}
    configs = {f"onednn{o}_xla{int(j)}": ({"TF_ENABLE_ONEDNN_OPTS": str(o)}, j) for o in (0, 1) for j in (False, True)}
    if FLAGS.configs:
        configs = {k: v for k, v in configs.items() if k in FLAGS.configs}
    best_name = None
    for arch in FLAGS.models:
        results = {}
        names = list(configs) if arch == "unet" or best_name is None else [best_name]
        for policy in FLAGS.policies:
            for name in names:
                env, jit = configs[name]
                key = name if policy == "float32" else f"{name}_{policy}"
                spec = {**common, "framework": "keras", "arch": arch, "jit": jit, "policy": policy}
                results[key] = _run_worker(spec, env)
        best_train, best_infer = _best(results, "train_steps_per_s"), _best(results, "infer_images_per_s")
        if arch == "unet":
            # U-T&T runs with the configuration (float32 keys) that trained U-Net fastest.
            best_name = _best({k: v for k, v in results.items() if k in configs}, "train_steps_per_s")
        report[arch] = {"configs": results, "best_train": best_train, "best_infer": best_infer}
    if FLAGS.torch and "unet" in FLAGS.models:
        try:
            import segmentation_models_pytorch  # noqa: F401,PLC0415
        except ImportError:
            report["torch_unet"] = "not installed"
        else:
            torch_results = {
                f"channels_last{int(cl)}": _run_worker(
                    {**common, "framework": "torch", "channels_last": cl, "torch_threads": FLAGS.torch_threads}, {})
                for cl in (False, True)
            }
            report["torch_unet"] = {"threads": FLAGS.torch_threads, "configs": torch_results}
            ours = {k: v for k, v in report["unet"]["configs"].items() if k in configs}  # float32 only
            for key, short in (("train_steps_per_s", "train"), ("infer_images_per_s", "infer")):
                b_ours, b_torch = _best(ours, key), _best(torch_results, key)
                if b_ours and b_torch:
                    report[f"ratio_{short}_sequential"] = round(ours[b_ours][key] / torch_results[b_torch][key], 3)
            b_ours, b_torch = _best(ours, "train_steps_per_s"), _best(torch_results, "train_steps_per_s")
            if FLAGS.rounds and b_ours and b_torch:
                env, jit = configs[b_ours]
                # Same precision on both sides: float32, then (if timed) Keras mixed_bfloat16
                # against torch.autocast(bfloat16).
                pairs = [("head_to_head", "float32", "", "")]
                if "mixed_bfloat16" in FLAGS.policies:
                    pairs.append(("head_to_head_bfloat16", "mixed_bfloat16", "_mixed_bfloat16", "_autocast_bfloat16"))
                for report_key, policy, ours_suffix, torch_suffix in pairs:
                    h2h = _head_to_head(
                        {**common, "framework": "keras", "arch": "unet", "jit": jit, "policy": policy}, env,
                        {**common, "framework": "torch", "channels_last": b_torch == "channels_last1",
                         "torch_threads": FLAGS.torch_threads, "bf16": policy != "float32"}, FLAGS.rounds)
                    report[report_key] = {"ours": b_ours + ours_suffix, "torch": b_torch + torch_suffix, **h2h}
                for short in ("train", "infer"):
                    if f"ratio_{short}" in report["head_to_head"]:
                        report[f"ratio_{short}"] = report["head_to_head"][f"ratio_{short}"]
    report["load_avg_end"] = os.getloadavg()
    print(json.dumps(report))


if __name__ == "__main__":
    app.run(main)
