"""`e2e-dist`: verbs only. Each parses its arguments, calls one function, prints the result.

Known errors (e2e_dist.errors.UserError) become one line on stderr and exit code 2; anything
else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from e2e_dist.cluster.local_record import ADDRESS_HELP
from e2e_dist.errors import UserError

DESCRIPTION = """Train end-to-end models (bytes->text, pixels->classes, waveform->characters) on Ray
with DeepSpeed ZeRO, W&B tracking and local or S3 checkpoints.

verbs:
  train       train one run from a YAML config or a preset (tiny-text, tiny-vision, tiny-speech)
  sweep       run a Ray Tune sweep (architectures, data-size ablations) from tune_configs/*.yaml
  plan        memory per GPU for each ZeRO stage / offload / micro-batch, and the fastest setting that fits
  scaling     fit scaling laws L(N, D) to a finished sweep's results, plot and summarize
  export      consolidate a checkpoint (any ZeRO stage) into one safetensors file
  generate    sample text from an exported text model (plain PyTorch)
  predict     classify an image / transcribe audio with an exported model (plain PyTorch)
  checkpoints list a run's checkpoints and whether each is committed
  data        `data plan CONFIG`: what a run's data costs (per rank, the shard index) before it trains;
              `data make-speech OUT` synthesizes the spoken-digits corpus,
              `data make-digits OUT` writes digit images in every input style from held-out fonts
  cluster     `cluster validate FILE`, `cluster local` (a local multi-node or autoscaling cluster),
              `cluster check` (collective bandwidth between and within a running cluster's nodes)
  submit      submit `e2e-dist train|sweep ...` as a Ray job to a cluster
  jobs        status | logs | stop | list of Ray jobs
  presets     list the built-in configs, model kinds and data sources (plug-ins included)
  check-plugin check a model / data plug-in against the contract (docs/plugins.md)"""


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="a run YAML file or a preset name (see `e2e-dist presets`)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field, e.g. --set trainer.max_steps=50 (repeatable)")


def cmd_train(args: argparse.Namespace) -> int:
    from e2e_dist.config import load_run_config
    from e2e_dist.train.launcher import run_training
    from e2e_dist.train.report import print_run_summary

    cfg = load_run_config(args.config, args.overrides)
    summary = run_training(cfg, resume=args.resume, address=args.address, quiet=args.quiet)
    print_run_summary(summary, cfg)
    return 0


def cmd_presets(args: argparse.Namespace) -> int:
    from e2e_dist.config import preset_names
    from e2e_dist.registry import entry_point_names

    print("\n".join(preset_names()))
    print(f"\nmodel kinds:  {', '.join(entry_point_names('e2e_dist.models'))}\n"
          f"data sources: {', '.join(entry_point_names('e2e_dist.data_sources'))}")
    return 0


def cmd_checkpoints(args: argparse.Namespace) -> int:
    from e2e_dist import checkpoint as ckpt
    from e2e_dist import storage
    from e2e_dist.checkpoint import universal
    from e2e_dist.config import StorageConfig

    storage_cfg = StorageConfig(path=args.run_uri, endpoint_url=args.endpoint_url)
    infos = ckpt.list_checkpoints(args.run_uri, storage_cfg, verify_checksums=args.verify)
    if not infos:
        if not storage.exists(args.run_uri, storage_cfg):
            raise UserError(f"no run at {args.run_uri} (no such directory or prefix)")
        print(f"no checkpoints under {args.run_uri} (no step_NNNNNNNN/ folder)")
    for info in infos:
        status = "committed" if info.committed else "CORRUPT  " if info.corrupt else "PARTIAL  "
        layout = universal.describe(info.manifest, info.uri, storage_cfg)
        print(f"{info.step:>10}  {status}  {layout:<24}  {info.uri}  {info.reason or ''}".rstrip())
    if args.verify:
        ok = sum(i.committed for i in infos)
        print(f"{ok} of {len(infos)} checkpoint(s) verified (every file's sha256 against its manifest)")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from e2e_dist.config import StorageConfig
    from e2e_dist.export import export_checkpoint

    info = export_checkpoint(args.checkpoint, args.out, StorageConfig(path=args.checkpoint, endpoint_url=args.endpoint_url))
    buffers = info.get("num_buffer_values", 0)
    print(f"exported step {info.get('step')} -> {args.out} ({info.get('num_tensors', '?')} tensors, "
          f"{info.get('num_params', 0):,} parameters" + (f" + {buffers:,} buffer values" if buffers else "") + ")")
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from e2e_dist.export import generate_from_export

    text = generate_from_export(args.exported, args.prompt, max_new_bytes=args.max_bytes,
                                temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed)
    print(args.prompt + text)
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    """Every input gets its answer or its one-line error (naming it); exit 1 if any failed."""
    from e2e_dist.errors import UserError
    from e2e_dist.predict import load_predictor, predict_details

    model, cfg = load_predictor(args.exported)
    failed = 0
    for path in args.inputs:
        try:
            result = predict_details(model, cfg, path)
            print(f"{path}\t{result.answer}\t{result.details}", flush=True)
        except UserError as e:
            failed += 1
            print(f"e2e-dist: error: {e}", file=sys.stderr, flush=True)
    if failed:
        print(f"e2e-dist: error: {failed} of {len(args.inputs)} input(s) failed", file=sys.stderr)
    return 1 if failed else 0


def cmd_data(args: argparse.Namespace) -> int:
    from e2e_dist.config import load_run_config
    from e2e_dist.data.speech import OTHER_VOICE_SHARE
    from e2e_dist.data.synth_speech import SPEEDS, corpus_voices, make_speech_corpus

    preset = load_run_config("tiny-speech").data
    variants, voices = corpus_voices(args.voices, args.held_out, args.split_seed, preset.synthesizers)
    speeds = (args.speed, args.speed) if args.speed else SPEEDS
    limit = args.max_seconds
    if limit is None and args.voices == "training":  # what the preset trains on, whole
        limit = preset.max_audio_seconds
    manifest = make_speech_corpus(args.out, n_utterances=args.n, seed=args.seed, variants=variants, speeds=speeds,
                                  max_seconds=limit, voices=voices, voice_share=OTHER_VOICE_SHARE)
    names = [f"{len(variants)} variants x 8 accents"] * bool(variants) + [v.label for v in voices]
    print(f"wrote {args.n} clips ({args.voices} voices: {', '.join(names)}; "
          f"{'speed ' + str(args.speed) if args.speed else f'speeds {SPEEDS[0]}-{SPEEDS[1]}'} wpm) and {manifest}")
    if args.voices == "training":
        print(f"train on it: e2e-dist train tiny-speech --set data.paths=[{manifest.parent}]")
    else:
        print(f"judge a model on it: e2e-dist predict EXPORT {manifest.parent}/wavs/*.wav (transcripts in the manifest)")
    return 0


def cmd_data_plan(args: argparse.Namespace) -> int:
    from e2e_dist.config import load_run_config
    from e2e_dist.console import RunLog, default_log_path
    from e2e_dist.data.data_plan import plan_data

    cfg = load_run_config(args.config, args.overrides)
    with RunLog(default_log_path(None, f"{cfg.name}-data-plan")) as run_log:
        lines = plan_data(cfg, address=args.address)
    print("\n".join([*lines, f"log file       {run_log.path}"]))
    return 0


def cmd_make_digits(args: argparse.Namespace) -> int:
    from e2e_dist.data.fonts import digit_fonts, split_fonts
    from e2e_dist.data.glyph_eval import STYLES, make_digit_styles

    train, held = split_fonts(digit_fonts(), args.held_out, args.seed)
    fonts = held if args.fonts == "held-out" else train
    if not fonts:
        raise UserError(f"--fonts {args.fonts}: no such fonts with --held-out {args.held_out} (try a larger share)")
    written = make_digit_styles(args.out, fonts, styles=args.styles or STYLES, seed=args.seed)
    designs = ", ".join(sorted({f.design for f in fonts}))
    print(f"wrote {len(written)} images: {len(fonts)} {args.fonts} fonts ({designs}) x 10 digits x "
          f"{len({w[2] for w in written})} styles, as {args.out}/<style>/<digit>/<file>")
    print(f"judge a model on them: e2e-dist predict EXPORT {args.out}/<style>/*/*")
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    from e2e_dist.sweep.runner import run_sweep_cli

    return run_sweep_cli(args)


def cmd_scaling(args: argparse.Namespace) -> int:
    from e2e_dist.sweep.scaling_report import scaling_cli

    return scaling_cli(args)


def cmd_plan(args: argparse.Namespace) -> int:
    from e2e_dist.plan.report import plan_cli

    return plan_cli(args)


def _add_run_verbs(sub: argparse._SubParsersAction) -> None:
    """train, sweep, scaling: the verbs that run on (or read results of) a Ray cluster."""
    p = sub.add_parser("train", help="train one run", description="Train one run on Ray Train + DeepSpeed.")
    _add_config_args(p)
    p.add_argument("--resume", action="store_true", help="continue the latest committed checkpoint of this run name")
    p.add_argument("--address", help=ADDRESS_HELP)
    p.add_argument("--quiet", action="store_true", help="no progress display")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("sweep", help="run a Ray Tune sweep", description="Run a sweep file from tune_configs/.")
    p.add_argument("sweep_file")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a sweep field or, under base., a run field: --set base.trainer.max_steps=20")
    p.add_argument("--resume", action="store_true", help="continue an interrupted sweep (Tuner.restore)")
    p.add_argument("--address", help=ADDRESS_HELP)
    p.set_defaults(func=cmd_sweep)

    p = sub.add_parser("plan", help="what fits a GPU before you pay for one: ZeRO stage, micro-batch, checkpointing",
                       description="Per-GPU memory (parameters, gradients, optimizer, buffers, activations) of every "
                                   "ZeRO layout, micro-batch and checkpointing choice, step time at a stated MFU, and "
                                   "the fastest setting that fits.",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    _add_config_args(p)
    p.add_argument("--gpus", type=_number(int, "a GPU count >= 1", lambda v: v >= 1), default=1, help="GPUs per node")
    p.add_argument("--nodes", type=_number(int, "a node count >= 1", lambda v: v >= 1), default=1, help="nodes")
    p.add_argument("--gpu", default="H100", help="card name, for its peak FLOP/s (and memory unless --gpu-mem)")
    p.add_argument("--gpu-mem", type=_number(float, "GiB > 0", lambda v: v > 0), metavar="GiB",
                   help="memory per GPU (default: the card's)")
    p.add_argument("--mfu", type=_number(float, "a fraction in (0, 1]", lambda v: 0 < v <= 1), default=0.4,
                   help="model FLOPs utilization assumed for step-time estimates")
    p.add_argument("--interconnect", choices=["efa", "ib", "tcp"],
                   help="network between nodes (default: efa for A100/H100/H200/B200, the p4d/p5/p6 types; else tcp)")
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("scaling", help="fit scaling laws to sweep results")
    p.add_argument("results_uri", help="a sweep's directory (local or s3://) holding results.jsonl")
    p.add_argument("--budget", type=float, help="compute budget in FLOPs for the compute-optimal (N, D)")
    p.add_argument("--holdout", metavar="largest|TRIAL",
                   help="fit without this trial ('largest': largest D, N or N*D) and report the prediction error on it")
    p.add_argument("--metric", help="the loss to fit (default: the sweep's own metric, else val_loss)")
    p.add_argument("--predict", action="append", metavar="N=..,D=..",
                   help="print the law's prediction with its interval at this point (repeatable)")
    p.add_argument("--endpoint-url", help="S3-compatible endpoint")
    p.set_defaults(func=cmd_scaling)


def _number(kind, what: str, ok):
    """An argparse type: `kind(text)` that must satisfy `ok`, else the one-line usage error naming it."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None
        if not ok(value):
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}")
        return value
    parse.__name__ = kind.__name__  # argparse names the type in some messages
    return parse


def _add_model_verbs(sub: argparse._SubParsersAction) -> None:
    """export, generate, predict, checkpoints: the verbs that read checkpoints and exported models."""
    p = sub.add_parser("export", help="consolidate a checkpoint into one safetensors file")
    p.add_argument("checkpoint", help="a checkpoint dir or a run dir (latest committed), local or s3://")
    p.add_argument("out", help="output .safetensors path, local or s3://")
    p.add_argument("--endpoint-url", help="S3-compatible endpoint")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("generate", help="sample text from an exported model",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("exported", help="an exported text model (.safetensors, local or s3://)")
    p.add_argument("--prompt", default="def ", help="text to continue")
    p.add_argument("--max-bytes", type=_number(int, "a positive integer", lambda v: v > 0), default=200,
                   help="bytes to generate")
    p.add_argument("--temperature", type=_number(float, "a number >= 0", lambda v: v >= 0), default=0.8,
                   help="sampling temperature; 0: always the likeliest byte")
    p.add_argument("--top-k", type=_number(int, "an integer >= 0", lambda v: v >= 0), default=40,
                   help="sample from the k likeliest bytes; 0: all 256")
    p.add_argument("--top-p", type=_number(float, "a number in (0, 1]", lambda v: 0 < v <= 1), default=1.0,
                   help="then from the smallest set of them holding this much probability; 1: no cut")
    p.add_argument("--seed", type=int, default=0, help="random seed (same seed, same text)")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("predict", help="image -> class, audio -> transcript, from an exported model",
                       description="Each input: a line 'FILE<TAB>ANSWER<TAB>DETAILS' (images: the class, its "
                                   "probability and the top 3; audio: the transcript and a confidence), or a "
                                   "one-line error naming it; exit 1 if any failed. README: the inputs accepted.")
    p.add_argument("exported")
    p.add_argument("inputs", nargs="+")
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("checkpoints", help="list a run's checkpoints")
    p.add_argument("run_uri")
    p.add_argument("--verify", action="store_true",
                   help="also read every committed checkpoint and check each file's sha256 (downloads it from S3)")
    p.add_argument("--endpoint-url", help="S3-compatible endpoint")
    p.set_defaults(func=cmd_checkpoints)


SPOKEN_DIGITS_UTTERANCES = 1200
"""The built-in spoken-digits corpus size (data/speech.py checks it is the same number: importing
it here would load numpy into every command)."""


def _add_builtin_verbs(sub: argparse._SubParsersAction) -> None:
    """data, presets: what ships with the package."""
    share = _number(float, "a share in [0, 1)", lambda v: 0 <= v < 1)  # --held-out: data.held_out of a run
    p = sub.add_parser("data", help="built-in data sets")
    dsub = p.add_subparsers(dest="data_verb", metavar="plan|make-speech|make-digits", required=True)
    q = dsub.add_parser("plan", help="what a run's data costs: samples, blocks, reads per rank, the shard index",
                        description="Build a run's data as `train` would (listing, shard index, splits) and say what "
                                    "grows with the corpus and the cluster, without training.")
    _add_config_args(q)
    q.add_argument("--address", help=ADDRESS_HELP)
    q.set_defaults(func=cmd_data_plan)
    q = dsub.add_parser("make-speech", help="synthesize the spoken-digits corpus (eSpeak NG, Flite, Festival: offline)",
                        description="Write the spoken-digits corpus (WAVs + manifest.jsonl) to OUT; "
                                    "`train tiny-speech --set data.paths=[OUT]` trains on it.",
                        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    q.add_argument("out")
    q.add_argument("-n", type=_number(int, "a clip count >= 1", lambda v: v >= 1), default=SPOKEN_DIGITS_UTTERANCES,
                   help="utterances (the built-in corpus `train tiny-speech` makes on its own has this many)")
    q.add_argument("--seed", type=int, default=0, help="seed of the corpus (texts, voices, prosody, noise)")
    q.add_argument("--voices", choices=["training", "held-out", "held-out-synthesizers"], default="training",
                   help="the voices tiny-speech trains on, the eSpeak variants it never hears, or the voices of "
                        "the synthesizers it never hears (Festival's: to judge a model)")
    q.add_argument("--held-out", type=share, default=0.25,
                   help="data.held_out of the run")
    q.add_argument("--split-seed", type=int, default=0, help="data.seed of the run (which variants are held out)")
    q.add_argument("--speed", type=_number(int, "words per minute in 80-450", lambda v: 80 <= v <= 450),
                   help="every clip at this speed (default: a random speed per clip)")
    q.add_argument("--max-seconds", type=_number(float, "seconds > 0", lambda v: v > 0),
                   help="no clip longer: longer ones are spoken faster (default: tiny-speech's data.max_audio_seconds "
                        "for training voices, none for held-out ones)")
    q.set_defaults(func=cmd_data)

    from e2e_dist.data.glyph_eval import STYLES

    q = dsub.add_parser("make-digits", help="digit images in the styles people bring, from held-out fonts",
                        description="Write digit images (DIR/<style>/<digit>/<file>) rendered from the installed "
                                    "fonts in every style `predict` accepts, to judge a digit-glyphs model on fonts "
                                    "it never saw. --held-out and --seed must be the run's data.held_out and "
                                    "data.seed.", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    q.add_argument("out")
    q.add_argument("--fonts", choices=["held-out", "training"], default="held-out",
                   help="the font designs training leaves out, or the ones it uses")
    q.add_argument("--held-out", type=share, default=0.25,
                   help="data.held_out of the run")
    q.add_argument("--seed", type=int, default=0, help="data.seed of the run")
    q.add_argument("--styles", nargs="+", choices=STYLES, metavar="STYLE", help=f"some of: {', '.join(STYLES)}")
    q.set_defaults(func=cmd_make_digits)

    p = sub.add_parser("presets", help="list built-in configs")
    p.set_defaults(func=cmd_presets)


class OneLineErrors(argparse.ArgumentParser):
    """argparse with our one-line usage errors: the problem and where the rest is (`--help`), not
    argparse's usage block first. Its verbs' parsers are of this class too (add_subparsers)."""

    def error(self, message: str):  # type: ignore[override]
        print(f"e2e-dist: error: {message} (see `{self.prog} --help`)", file=sys.stderr)
        raise SystemExit(2)


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineErrors(prog="e2e-dist", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="show what Ray, DeepSpeed and other libraries print (always in the run's log file)")
    sub = parser.add_subparsers(dest="verb", metavar="VERB")
    _add_run_verbs(sub)
    _add_model_verbs(sub)
    _add_builtin_verbs(sub)
    importlib.import_module("e2e_dist.plugins").register_cli(sub)
    try:
        commands = importlib.import_module("e2e_dist.cluster.commands")
        commands.register(sub)
    except ModuleNotFoundError:
        pass
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    from e2e_dist.console import setup_console

    setup_console(verbose=args.verbose)
    try:
        return int(args.func(args) or 0)
    except UserError as e:
        print(f"e2e-dist: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("e2e-dist: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
