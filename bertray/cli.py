"""`bertray pretrain|finetune|tune|label|serve|evaluate|predict|export|validate`: a thin layer over each stage's
`run(cfg)`.

Every stage takes `--config FILE.yaml` and `--set key=value` overrides; the convenience flags below are only
shorthands for config keys. The config is validated before Ray starts: problems exit with code 2.
"""
from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import sys

from bertray import config as C

# stage -> (module, config class name, {flag: (config key, kind)}); kind: 'value', 'list' (comma-separated values)
# or 'flag' (store_true); any other kind is the value a store_true flag sets.
_TRAIN_FLAGS = {
    "--num-workers": ("run.num_workers", "value"),
    "--use-gpu": ("run.use_gpu", "flag"),
    "--name": ("run.name", "value"),
    "--storage": ("run.storage", "value"),
    "--address": ("run.ray_address", "value"),
    "--overwrite": ("run.overwrite", "flag"),
}
STAGES = {
    "pretrain": ("bertray.pretrain", "PretrainConfig", _TRAIN_FLAGS),
    "finetune": ("bertray.finetune", "FinetuneConfig", _TRAIN_FLAGS),
    "tune": ("bertray.tune", "TuneConfig", {
        **{k: v for k, v in _TRAIN_FLAGS.items() if k not in ("--num-workers", "--use-gpu")},
        "--workers-per-trial": ("search.workers_per_trial", "value"),
        "--gpus-per-trial": ("search.gpus_per_trial", "value"),
        "--cpus-per-trial": ("search.cpus_per_trial", "value"),
    }),
    "label": ("bertray.label", "LabelConfig", {
        "--model": ("model", "value"),
        "--input": ("input", "value"),
        "--output": ("output", "value"),
        "--text-column": ("text_column", "value"),
        "--text-pair-column": ("text_pair_column", "value"),
        "--long-text": ("long_text", "value"),
        "--id-column": ("id_column", "value"),
        "--passthrough": ("passthrough", "list"),
        "--probabilities": ("probabilities", "flag"),
        "--rows-per-file": ("rows_per_file", "value"),
        "--actors": ("actors", "value"),
        "--gpus-per-actor": ("gpus_per_actor", "value"),
        "--quantize": ("quantize", "value"),
        "--backend": ("backend", "value"),
        "--skip-empty": ("on_empty", "skip"),
        "--skip-bad-files": ("on_bad_file", "skip"),
        "--overwrite": ("overwrite", "flag"),
        "--address": ("ray_address", "value"),
    }),
    "serve": ("bertray.serve", "ServeConfig", {
        "--model": ("model", "value"),
        "--host": ("host", "value"),
        "--port": ("port", "value"),
        "--replicas": ("replicas", "value"),
        "--autoscaling": ("autoscaling", "flag"),
        "--api-key-env": ("api_key_env", "value"),
        "--quantize": ("quantize", "value"),
        "--backend": ("backend", "value"),
        "--long-text": ("long_text", "value"),
        "--ingress": ("ingress", "value"),
        "--address": ("ray_address", "value"),
    }),
}


def _known_errors() -> tuple[type, ...]:
    from bertray.data import DataError
    from bertray.modeling import ModelError
    from bertray.storage import StorageError

    from bertray.trainer import TrainingDiverged

    errors = (DataError, ModelError, StorageError, TrainingDiverged, FileNotFoundError, PermissionError)
    # Only a serve run raises ServeStartError; importing bertray.serve (FastAPI, Ray Serve) to catch others is waste.
    serve_mod = sys.modules.get("bertray.serve")
    return errors + ((serve_mod.ServeStartError,) if serve_mod else ())


def build_config(stage: str, config_file: str | None, sets: list[str], flags: dict) -> object:
    _, cls_name, flag_map = STAGES[stage]
    overrides = list(sets or [])
    given = {s.partition("=")[0].strip(): s.partition("=")[2].strip() for s in overrides}
    conflicts = []
    for flag, (key, kind) in flag_map.items():
        value = flags.get(flag.lstrip("-").replace("-", "_"))
        if value in (None, False):
            continue
        if kind == "list":
            value = "[" + ", ".join(v.strip() for v in str(value).split(",")) + "]"
        value = {"flag": "true", "value": value, "list": value}.get(kind, kind)
        if key in given and not _same_value(given[key], value):
            conflicts.append(f"{flag} {value} contradicts --set {key}={given[key]}; give one of them")
        overrides.append(f"{key}={value}")
    if conflicts:
        raise C.ConfigError(conflicts, "command line")
    return C.load(getattr(C, cls_name), config_file, overrides)


def _same_value(a: str, b: str) -> bool:
    import yaml

    try:
        return yaml.safe_load(a) == yaml.safe_load(b)
    except yaml.YAMLError:
        return a == b


def detect_stage(path: str) -> str:
    """Guess which stage a YAML file configures from its sections (for `bertray validate`)."""
    raw = C.read_yaml(path) or {}
    if not isinstance(raw, dict):
        return "finetune"
    if "search" in raw:
        return "tune"
    if "mlm" in raw:
        return "pretrain"
    if "input" in raw or "output" in raw:
        return "label"
    if {"port", "replicas", "max_batch_size"} & set(raw):
        return "serve"
    return "finetune"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bertray", description="Distributed BERT text classification on Ray.")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True)
    for stage, (_, _, flag_map) in STAGES.items():
        sp = sub.add_parser(stage, help=f"run the {stage} stage")
        sp.add_argument("--config", help="YAML file holding differences from the defaults")
        sp.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key, e.g. --set optim.lr=3e-5 (repeatable)")
        for flag, (key, kind) in flag_map.items():
            if kind == "value":
                sp.add_argument(flag, help=f"same as --set {key}=...")
            elif kind == "list":
                sp.add_argument(flag, help=f"comma-separated; same as --set {key}=[a, b]")
            else:
                sp.add_argument(flag, action="store_true", help=f"same as --set {key}={'true' if kind == 'flag' else kind}")
    v = sub.add_parser("validate", help="check a config file and exit (0 ok, 2 problems)")
    v.add_argument("file", help="the YAML config file to check")
    v.add_argument("--stage", choices=list(STAGES), help="which stage it configures (default: guessed from its sections)")
    v.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    e = sub.add_parser("evaluate", help="metrics JSON and confusion-matrix PNG of MODEL on labeled DATA")
    e.add_argument("model", help="a classifier checkpoint (local or s3://) or a Hugging Face classifier")
    e.add_argument("data", help="labeled Parquet, CSV or JSON Lines: a file, folder or glob, local or s3://")
    e.add_argument("--out", default=None, help="output folder (default: outputs/evaluate-<model name>)")
    e.add_argument("--text-column", action="append", dest="text_columns", default=None)
    e.add_argument("--label-column", default="label")
    e.add_argument("--text-pair-column", default=None, help="the second text of each pair (a pair model)")
    e.add_argument("--label-delimiter", default=None, help="multi-label: labels in one string, split at this")
    e.add_argument("--max-length", type=int, default=None, help="tokens per text (default: the checkpoint's)")
    e.add_argument("--long-text", choices=["truncate", "chunk"], default=None,
                   help="texts over max_length: truncate, or score overlapping windows pooled per text "
                        "(default: as the checkpoint says)")
    e.add_argument("--quantize", choices=["none", "int8", "bf16"], default="none")
    e.add_argument("--backend", choices=["torch", "onnxruntime"], default="torch",
                   help="onnxruntime: MODEL as an ONNX export, or exported on the fly (CPU)")
    e.add_argument("--max-rows", type=int, default=None)
    pr = sub.add_parser("predict", help="label a few texts")
    pr.add_argument("model", help="a classifier checkpoint (local or s3://) or a Hugging Face classifier")
    pr.add_argument("texts", nargs="+", help="one or more texts to label")
    pr.add_argument("--backend", choices=["torch", "onnxruntime"], default="torch")
    x = sub.add_parser("export", help="MODEL as an ONNX model folder, checked against PyTorch on a sample")
    x.add_argument("model", help="a classifier checkpoint (local or s3://) or a Hugging Face classifier")
    x.add_argument("--format", choices=["onnx"], default="onnx")
    x.add_argument("--quantize", choices=["none", "int8"], default="none",
                   help="int8: ONNX Runtime's dynamic quantization; reports how many fp32 labels it keeps")
    x.add_argument("--output", required=True, help="a new or empty folder, local or s3://")
    x.add_argument("--sample", default=None,
                   help="texts to check the export on: Parquet, CSV or JSON Lines (default: random token ids)")
    x.add_argument("--text-column", default="text", help="the --sample column holding the texts")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    os.environ.setdefault("RAY_TRAIN_ENABLE_V2_MIGRATION_WARNINGS", "0")
    try:
        if args.command == "validate":
            stage = args.stage or detect_stage(args.file)
            build_config(stage, args.file, args.set, {})
            print(f"{args.file}: valid {stage} config")
            return 0
        if args.command == "evaluate":
            from bertray import evaluate

            if args.backend == "onnxruntime" and args.quantize == "bf16":
                parser.error("--quantize bf16 is a torch option; with --backend onnxruntime use int8 or none")

            result = evaluate.run_cli(args)
            print(json.dumps(result["summary"], indent=2))
            return 0
        if args.command == "export":
            from bertray import export

            meta = export.run(args.model, args.output, args.quantize, args.sample, args.text_column)
            print(json.dumps({"output": args.output, "quantize": meta["quantize"], "parity": meta["parity"]},
                             indent=2))
            return 0
        if args.command == "predict":
            from bertray.data import DataError, invalid_text
            from bertray.predictor import Predictor

            for i, text in enumerate(args.texts, 1):
                if not text.strip():  # the rule serve and label apply: an empty text has no label
                    raise DataError(f"text {i}: empty text")
                if reason := invalid_text(text):  # undecodable bytes on the command line arrive as lone surrogates
                    raise DataError(f"text {i}: {reason} (its bytes are not UTF-8)")
            from bertray.modeling import classifier_labels

            if classifier_labels(args.model)[1].get("text_pair"):  # from bertray.json, before loading the weights
                raise DataError(f"{args.model} classifies sentence pairs; score them with `bertray evaluate` or "
                                "`bertray label --text-pair-column`, or send {\"pairs\": [[a, b]]} to `bertray serve`")
            pred = Predictor(args.model, backend=args.backend)
            probs = pred.predict(args.texts).probs
            for text, p in zip(args.texts, probs):
                if pred.multi_label:  # every label at or over its threshold, most probable first
                    on = pred.chosen(p)
                    print(f"{','.join(pred.label_names[k] for k in on) or '-'}\t"
                          f"{' '.join(f'{p[k]:.3f}' for k in on) or '-'}\t{text}")
                    continue
                i = int(p.argmax())
                print(f"{pred.label_names[i]}\t{p[i]:.3f}\t{text}")
            return 0
        cfg = build_config(args.command, args.config, args.set, vars(args))
        module = importlib.import_module(STAGES[args.command][0])
        from bertray import runtime

        runtime.init_ray(getattr(getattr(cfg, "run", cfg), "ray_address", None))
        module.run(cfg)
        return 0
    except C.ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except _known_errors() as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted; re-run the same command to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
