"""``omni train STAGE.yaml``, ``omni train-all``, ``omni speak`` and ``omni generate``: registered into the
``omni`` command by pipelines/cli.py.

Also runnable alone: ``python -m trainer.cli train conf/stages/1.1-image-projector.yaml --nproc 2``.
A stage may be named by its id (``omni train 1.1``): the shipped stage configs (``conf/stages`` in a
checkout, ``omnicorpus_conf/stages`` in an installed wheel). ``--smoke`` shrinks it to finish in under a
minute on two CPU cores (trainer/smoke.py). ``omni train-all --mixtures DIR`` trains every stage on the
mixture ``omni plan --mixtures DIR`` wrote for it.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from trainer.stages import CONF_DIR, StageError


def _user_error(msg: str) -> Exception:
    from pipelines.cli import UserError

    return UserError(msg)


def _launch_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--set",
        action="append",
        default=[],
        dest="overrides",
        metavar="KEY=VALUE",
        help="override a stage field, e.g. --set budget.steps=10 --set output=runs/x",
    )
    p.add_argument("--nproc", type=int, help="ranks on this machine (default: GPUs, or 2 on CPU)")
    p.add_argument("--hostfile", help="DeepSpeed hostfile for multi-node runs (uses the deepspeed launcher)")
    p.add_argument("--master-addr", default="127.0.0.1", help="rank 0's address (multi-node: a reachable IP)")
    p.add_argument("--master-port", type=int, help="rendezvous port (default: a free one)")
    p.add_argument(
        "--smoke",
        action="store_true",
        help="a quick check: tiny model, 256-token sequences, 5 steps, one rank; missing shards are replaced "
        "by a small sample set; everything under $OMNI_RUNS/smoke (runs/smoke)",
    )


def _check(args: argparse.Namespace) -> None:
    if args.nproc is not None and args.nproc < 1:
        raise _user_error(f"--nproc must be at least 1, not {args.nproc}")
    if args.hostfile and not os.path.isfile(args.hostfile):
        raise FileNotFoundError(f"no hostfile {args.hostfile}")
    for o in args.overrides:
        if "=" not in o:
            raise _user_error(f"--set {o!r} is not KEY=VALUE")


def _smoke(paths: list, args: argparse.Namespace) -> list:
    """The smoke versions of the stage YAMLs; the overrides are in them, so none go to the ranks."""
    from pipelines.overrides import OverrideError
    from trainer.smoke import SmokeError, prepare, smoke_dir

    mixtures = getattr(args, "mixtures", None)
    try:
        out = prepare(
            paths, args.overrides, smoke_dir(), say=lambda m: print(f"smoke: {m}", flush=True), mixtures=mixtures
        )
    except (StageError, SmokeError, OverrideError) as e:
        raise _user_error(str(e)) from e
    args.overrides = []
    args.mixtures = None  # the planned mixtures are in the smoke YAMLs now
    if args.nproc is None and not args.hostfile:
        args.nproc = 1  # one rank starts and steps faster than two on a small machine
    return out


def _run(stages: list, args: argparse.Namespace) -> int:
    from trainer.data import resolve_entry
    from trainer.launch import launch

    for stage in stages:  # a missing manifest or an empty kind filter fails here, before any rank starts
        for entry in stage.mixture:
            try:
                resolve_entry(entry, stage.allow_uris, stage.verify_shards)
            except (ValueError, KeyError) as e:
                raise _user_error(f"stage {stage.stage}: {e}") from e
    code = launch(
        stages,
        args.overrides,
        args.nproc,
        args.hostfile,
        args.master_addr,
        args.master_port,
        getattr(args, "mixtures", None),
    )
    if getattr(args, "smoke", False) and code == 0:
        what = ("stage " if len(stages) == 1 else "stages ") + ", ".join(s.stage for s in stages)
        took = time.monotonic() - args.started
        print(f"smoke: {what} trained in {took:.0f} s; output in {stages[0].output}", flush=True)
    return code


def _estimate(args: argparse.Namespace, paths: list, table: bool) -> int:
    """``--estimate``: per-GPU memory and tokens/s (trainer/estimate.py); nothing is launched or trained."""
    from pipelines.overrides import OverrideError
    from trainer.estimate import EstimateError, run
    from trainer.stages import load_stage

    if args.smoke:
        raise _user_error("--estimate and --smoke do not go together: the estimate is for the stage as configured")
    try:
        return run(args, [load_stage(p, args.overrides) for p in paths], table=table)
    except (StageError, EstimateError, OverrideError) as e:
        raise _user_error(str(e)) from e


def _cmd_train(args: argparse.Namespace) -> int:
    from trainer.stages import load_stage, resolve_stage_ref

    args.started = time.monotonic()
    _check(args)
    path = resolve_stage_ref(args.stage)
    if args.estimate:
        return _estimate(args, [path], table=False)
    paths = _smoke([path], args) if args.smoke else [path]
    try:
        stage = load_stage(paths[0], args.overrides)
    except StageError as e:
        raise _user_error(str(e)) from e
    return _run([stage], args)


def _planned(stages: list, mixtures: str) -> None:
    """Say which mixture every stage trains on with ``--mixtures DIR``; a planned file that keeps no
    entry stops the run before it starts."""
    import re

    from trainer.stages import load_yaml, planned_mixture_file

    ids = {s.stage for s in stages}
    for s in stages:
        path = planned_mixture_file(mixtures, s.stage)
        if not path.is_file():
            print(f"mixtures: stage {s.stage}: no {path.name} in {mixtures}; the stage's own mixture", flush=True)
            continue
        try:
            doc = load_yaml(path)
        except StageError as e:
            raise _user_error(str(e)) from e
        dropped = [d for d in doc.get("dropped") or [] if isinstance(d, dict)]
        if not doc.get("mixture"):
            why = "; ".join(f"{d.get('name')}: {d.get('reason')}" for d in dropped) or "no entries"
            raise _user_error(
                f"stage {s.stage}: the planned mixture {path} keeps no entry ({why}); produce those shard sets "
                f"and plan again, or leave the stage out (--from / --until)"
            )
        note = f" ({', '.join(str(d.get('name')) for d in dropped)} dropped by the plan)" if dropped else ""
        print(f"mixtures: stage {s.stage}: {path}{note}", flush=True)
    others = []
    for f in sorted(os.listdir(mixtures)):
        m = re.fullmatch(r"mixture-(.+)\.ya?ml", f)
        if m and m.group(1) not in ids:
            others.append(m.group(1))
    if others:
        print(f"mixtures: ignored (stages not in this run): {', '.join(others)}", flush=True)


def _cmd_train_all(args: argparse.Namespace) -> int:
    from trainer.stages import discover_stages, load_stage, stage_key

    args.started = time.monotonic()
    _check(args)
    if args.mixtures is not None and not os.path.isdir(args.mixtures):
        raise _user_error(
            f"--mixtures {args.mixtures}: no such folder (omni plan CORPUS --have RUN ... --mixtures DIR writes it)"
        )
    try:
        stages = discover_stages(args.stages, args.overrides)
        if args.start:
            stages = [s for s in stages if stage_key(s.stage) >= stage_key(args.start)]
        if args.until:
            stages = [s for s in stages if stage_key(s.stage) <= stage_key(args.until)]
    except StageError as e:
        raise _user_error(str(e)) from e
    if not stages:
        raise _user_error(f"no stage from {args.start or 'the first'} to {args.until or 'the last'} in {args.stages}")
    if args.estimate:
        return _estimate(args, [s.path for s in stages], table=True)
    if args.mixtures:
        _planned(stages, args.mixtures)
    try:
        if args.smoke:
            stages = [load_stage(p) for p in _smoke([s.path for s in stages], args)]
        elif args.mixtures:
            stages = [load_stage(s.path, args.overrides, args.mixtures) for s in stages]
    except StageError as e:
        raise _user_error(str(e)) from e
    return _run(stages, args)


def _load_generator(args: argparse.Namespace):
    """``OmniGenerator.from_run`` for a run directory; trainer.export's ``load_generator`` for an ``omni
    export`` directory (a config.json), its flow decoder and vocoder from ``--flow`` / ``--vocoder`` or
    the run it was exported from."""
    import torch

    from trainer.export import ExportError, load_generator, read_config
    from trainer.generate import GenerationError, OmniGenerator

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise _user_error(f"--device {args.device}: no CUDA device here")
    try:
        if not os.path.isfile(os.path.join(args.run_dir, "config.json")):
            if args.flow or args.vocoder:
                raise _user_error(
                    f"--flow / --vocoder go with an export directory; {args.run_dir} is a run directory "
                    "(its own stages 0.2 and 0.3 are used)"
                )
            return OmniGenerator.from_run(args.run_dir, stage=args.stage, device=args.device)
        exported = (read_config(args.run_dir).get("omni_stage") or {}).get("stage")
        if args.stage is not None and args.stage != exported:
            raise _user_error(f"--stage {args.stage}: {args.run_dir} is an export of stage {exported}")
        return load_generator(
            args.run_dir, flow=args.flow, vocoder=args.vocoder, device=args.device, require_audio=True
        )
    except (GenerationError, ExportError) as e:
        raise _user_error(str(e)) from e


def _positive(name: str, value: int | float | None) -> None:
    if value is not None and value < 0:
        raise _user_error(f"{name} must not be negative, not {value}")


def _decode_kw(args: argparse.Namespace) -> dict:
    return {
        "chunk_frames": args.chunk_frames or None,
        "overlap_frames": args.overlap_frames,
        "flow_steps": args.flow_steps,
    }


def _check_sampling(args: argparse.Namespace) -> None:
    for name in ("max_frames", "min_frames", "temperature", "chunk_frames", "overlap_frames"):
        _positive("--" + name.replace("_", "-"), getattr(args, name))
    if args.flow_steps is not None and args.flow_steps < 1:
        raise _user_error(f"--flow-steps must be at least 1, not {args.flow_steps}")
    if args.min_frames > args.max_frames:
        raise _user_error(f"--min-frames {args.min_frames} exceeds --max-frames {args.max_frames}")
    if args.chunk_frames and args.overlap_frames >= args.chunk_frames:
        raise _user_error(f"--overlap-frames {args.overlap_frames} must be below --chunk-frames {args.chunk_frames}")


def _out_file(path: str) -> None:
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise _user_error(f"no directory {parent} for {path}")


def _cmd_speak(args: argparse.Namespace) -> int:
    from trainer.generate import SAMPLE_RATE, GenerationError, write_wav

    _check_sampling(args)
    _out_file(args.out)
    if not args.text.strip():
        raise _user_error("--text is empty")
    gen = _load_generator(args)
    codes = gen.speak_codes(
        args.text,
        seed=args.seed,
        max_frames=args.max_frames,
        min_frames=args.min_frames,
        temperature=args.temperature,
        top_k=args.top_k,
    )
    try:
        wave = gen.codes_to_wave(codes, seed=args.seed, **_decode_kw(args))
    except GenerationError as e:
        raise _user_error(str(e)) from e
    write_wav(args.out, wave, SAMPLE_RATE)
    n = int(codes.shape[0])
    print(f"{args.out}: {n} frames, {len(wave) / SAMPLE_RATE:.2f} s at {SAMPLE_RATE} Hz (stage {gen.stage})")
    return 0


def _cmd_generate(args: argparse.Namespace) -> int:
    from trainer.generate import SAMPLE_RATE, GenerationError, Sampling, write_wav

    _check_sampling(args)
    for f in (args.image, args.audio):
        if f is not None and not os.path.isfile(f):
            raise _user_error(f"no file {f}")
    os.makedirs(args.out_dir, exist_ok=True)
    gen = _load_generator(args)
    try:
        parts = gen.generate(
            args.prompt,
            image=args.image,
            audio=args.audio,
            seed=args.seed,
            max_new_tokens=args.max_new_tokens,
            max_frames=args.max_frames,
            min_frames=args.min_frames,
            text=Sampling(args.text_temperature, args.text_top_k, args.top_p),
            speech=Sampling(args.temperature, args.top_k),
            **_decode_kw(args),
        )
    except GenerationError as e:
        raise _user_error(str(e)) from e
    n_audio = 0
    for part in parts:
        if part["type"] == "text":
            print(part["text"])
        else:
            n_audio += 1
            path = os.path.join(args.out_dir, f"reply-{n_audio:02d}.wav")
            write_wav(path, part["wave"], part["sample_rate"])
            secs = len(part["wave"]) / SAMPLE_RATE
            print(f"[audio {path}: {part['frames']} frames, {secs:.2f} s at {SAMPLE_RATE} Hz]")
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from trainer.export import ExportError, export_stage

    try:
        info = export_stage(
            args.stage_dir,
            args.out,
            max_shard_size=args.max_shard_size,
            dtype=args.dtype,
            tokenizer=args.tokenizer,
            force=args.force,
            fmt=args.format,
            partial=args.partial,
        )
    except ExportError as e:
        raise _user_error(str(e)) from e
    if args.format == "release":
        left = f"; not written: {', '.join(info['unplaced'][:3])}" if info["unplaced"] else ""
        left += f" (+{len(info['unplaced']) - 3} more)" if len(info["unplaced"]) > 3 else ""
        print(f"{info['out']}: stage {info['stage']}, {info['tensors']} tensors in the released layout{left}")
        return 0
    what = "Qwen2ForCausalLM loads its LLM" if info["transformers"] else "an audio stage: not transformers-loadable"
    print(
        f"{info['out']}: stage {info['stage']} ({info['task']}), {info['tensors']} tensors in {info['shards']} "
        f"shard(s), {info['bytes'] / 1e6:.1f} MB {'/'.join(info['dtypes'])}; {what}"
    )
    return 0


def _cmd_import(args: argparse.Namespace) -> int:
    from trainer.release import ReleaseLayoutError, export_release, import_release, parse_size
    from trainer.stages import load_model_config
    from trainer.weights import WeightsMismatch

    if (args.release_dir is None) == (args.to_release is None):
        raise _user_error("give a RELEASE_DIR to import, or --to-release MODEL_PT to write the released layout")
    try:
        cfg = load_model_config(args.model)
    except StageError as e:
        raise _user_error(str(e)) from e
    say = lambda m: print(m, flush=True)  # noqa: E731
    try:
        if args.to_release is not None:
            export_release(
                args.to_release, cfg, args.out, partial=args.partial, max_bytes=parse_size(args.max_shard_size), say=say
            )
        else:
            import_release(args.release_dir, cfg, args.out, partial=args.partial, say=say)
    except (ReleaseLayoutError, WeightsMismatch) as e:
        raise _user_error(str(e)) from e
    return 0


def _generation_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "run_dir",
        help="training run directory (holds <stage>/final/, 0.2/final/, 0.3/final/), or an omni export of an LLM stage",
    )
    p.add_argument("--stage", help="LLM stage to load (default: the latest finished one)")
    p.add_argument(
        "--flow",
        metavar="DIR",
        help="with an export: stage 0.2's export or stage directory (default: the exported run's 0.2)",
    )
    p.add_argument(
        "--vocoder",
        metavar="DIR",
        help="with an export: stage 0.3's export or stage directory (default: the exported run's 0.3)",
    )
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    p.add_argument("--max-frames", type=int, default=750, help="most 12.5 Hz frames per speech part (default 750)")
    p.add_argument("--min-frames", type=int, default=0, help="frames before end-of-audio is allowed (default 0)")
    p.add_argument("--temperature", type=float, default=0.9, help="audio-code sampling temperature (0: greedy)")
    p.add_argument("--top-k", type=int, default=30, help="audio-code top-k (0: off)")
    p.add_argument("--chunk-frames", type=int, default=50, help="frames per flow/vocoder window (0: one window)")
    p.add_argument("--overlap-frames", type=int, default=4, help="cross-faded frames between windows")
    p.add_argument("--flow-steps", type=int, help="Euler steps of the flow decoder (default: its config's)")
    p.add_argument("--device", default="cpu", help="torch device (default cpu)")


def register(subparsers: argparse._SubParsersAction) -> None:
    from trainer.estimate import add_arguments as estimate_arguments

    t = subparsers.add_parser("train", help="train one stage (conf/stages/*.yaml) with DeepSpeed")
    t.add_argument("stage", help="stage config YAML, or a shipped stage's id (0.1 ... 4.2)")
    _launch_args(t)
    estimate_arguments(t)
    t.set_defaults(fn=_cmd_train)

    a = subparsers.add_parser(
        "train-all", help="train every stage in order (0.1 -> 0.2 -> 0.3 -> 1.1 -> ... -> 4.2), each from the previous"
    )
    a.add_argument("--stages", default=str(CONF_DIR / "stages"), help="directory of stage YAMLs")
    a.add_argument("--from", dest="start", help="start at this stage id (e.g. 1.1: the audio stages ran elsewhere)")
    a.add_argument("--until", help="stop after this stage id (e.g. 2.2; 0.3: only the audio stages)")
    a.add_argument(
        "--mixtures",
        metavar="DIR",
        help="the mixtures omni plan --mixtures DIR wrote: each stage trains on DIR/mixture-<stage>.yaml "
        "(its own mixture where the folder has none)",
    )
    _launch_args(a)
    estimate_arguments(a)
    a.set_defaults(fn=_cmd_train_all)

    s = subparsers.add_parser("speak", help="speak a text with a trained run or an export (24 kHz WAV)")
    _generation_args(s)
    s.add_argument("--text", required=True, help="what to say")
    s.add_argument("--out", required=True, help="output WAV (16-bit mono, 24 kHz)")
    s.set_defaults(fn=_cmd_speak)

    g = subparsers.add_parser("generate", help="reply to a prompt (+ image / audio) in text and speech")
    _generation_args(g)
    g.add_argument("--prompt", required=True, help="text prompt; <image> / <audio> mark where the media go")
    g.add_argument("--image", help="image file")
    g.add_argument("--audio", help="audio file")
    g.add_argument("--out-dir", default=".", help="where speech parts go as reply-NN.wav (default .)")
    g.add_argument("--max-new-tokens", type=int, default=256, help="most text tokens (default 256)")
    g.add_argument("--text-temperature", type=float, default=0.7, help="text sampling temperature (0: greedy)")
    g.add_argument("--text-top-k", type=int, default=50, help="text top-k (0: off)")
    g.add_argument("--top-p", type=float, default=0.9, help="text nucleus sampling mass (default 0.9)")
    g.set_defaults(fn=_cmd_generate)

    e = subparsers.add_parser(
        "export", help="a finished stage as safetensors shards + config.json + tokenizer (Hugging Face layout)"
    )
    e.add_argument("stage_dir", help="a stage's directory (RUN_DIR/STAGE, holding final/model.pt and done.json)")
    e.add_argument("--out", required=True, help="output directory (new, or empty; --force writes over an export)")
    e.add_argument("--max-shard-size", default="5GB", help="largest shard: 5GB (default), 500MB, 2GiB, bytes")
    e.add_argument(
        "--dtype", choices=("keep", "bf16", "fp32"), default="keep", help="tensor dtype (default: as stored)"
    )
    e.add_argument("--tokenizer", help="text tokenizer directory (default: the one the stage records)")
    e.add_argument(
        "--format", choices=("hf", "release"), default="hf", help="hf (default) or the released model's layout"
    )
    e.add_argument(
        "--partial", action="store_true", help="--format release: leave out what the release has no place for"
    )
    e.add_argument("--force", action="store_true", help="write into a non-empty --out, replacing its export")
    e.set_defaults(fn=_cmd_export)

    im = subparsers.add_parser(
        "import", help="the released Baichuan-Omni-1.5 checkpoint into our model (or --to-release: back)"
    )
    im.add_argument("release_dir", nargs="?", help="released checkpoint directory (safetensors + index)")
    im.add_argument(
        "--to-release", metavar="MODEL_PT", help="write this model.pt (or its directory) in the released layout"
    )
    im.add_argument("--model", required=True, help="model config (conf/models name or YAML), e.g. baichuan-omni-1.5")
    im.add_argument("--out", required=True, help="import: OUT_DIR gets model.pt + done.json (init_from: OUT_DIR)")
    im.add_argument(
        "--partial", action="store_true", help="load what maps and list the rest (the audio decoder has no place)"
    )
    im.add_argument("--max-shard-size", default="5GB", help="--to-release: largest shard (default 5GB)")
    im.set_defaults(fn=_cmd_import)


def main(argv: list[str] | None = None) -> int:
    from pipelines.cli import UserError

    parser = argparse.ArgumentParser(prog="omni", description="omni-modal staged training with DeepSpeed")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    try:
        return args.fn(args)
    except (UserError, FileNotFoundError) as e:
        print(f"omni: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
