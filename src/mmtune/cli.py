"""`mmtune` command line. Every command has --help; heavy modules are imported lazily.

User errors (a bad recipe, a missing file, a malformed record) print one line and exit 2.
"""

from __future__ import annotations

import argparse
import os
import sys
import textwrap

from .errors import MMTuneError

EPILOG = textwrap.dedent("""\
    examples:
      mmtune demo                                  # LoRA-tune SmolLM2-135M-Instruct on new skills (CPU, minutes)
      mmtune config list                           # shipped recipes
      mmtune config copy sft-lora my.yaml          # copy one to edit
      mmtune data inspect my.yaml                  # see how records are templated and which tokens carry loss
      mmtune data check data/train.jsonl           # every record; exit 1 if any is bad (CI)
      mmtune train my.yaml train.lr=1e-4          # train, with dotted overrides
      mmtune train my.yaml --resume                # continue exactly where it stopped
      mmtune export runs/x/checkpoints/step-00000100 out/adapter
      mmtune merge runs/x/final out/merged --dtype bfloat16
      mmtune chat out/merged
    """)


def _add_overrides(p: argparse.ArgumentParser) -> None:
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="dotted overrides of recipe fields, e.g. train.lr=1e-4 data.max_length=512")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="mmtune", description="Fine-tune Hugging Face models on hardware you can afford.",
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG)
    ap.add_argument("--version", action="version", version=f"mmtune {__import__('mmtune').__version__}")
    sub = ap.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    p = sub.add_parser("train", help="train a recipe (SFT, continued pretraining, DPO, encoder objectives)",
                       description="Train RECIPE (a YAML file or a shipped recipe name). Checkpoints, "
                       "metrics.jsonl and reports go to train.output_dir.")
    p.add_argument("recipe", help="recipe YAML path or shipped recipe name (see `mmtune config list`)")
    _add_overrides(p)
    p.add_argument("--resume", nargs="?", const=True, default=False, metavar="CKPT",
                   help="continue from the latest checkpoint in output_dir (or from CKPT)")
    p.add_argument("--overwrite", action="store_true",
                   help="start fresh even if output_dir already holds checkpoints (they are deleted)")
    p.add_argument("--nproc", type=int, default=1, help="data-parallel processes on this machine (torchrun)")

    p = sub.add_parser("export", help="training checkpoint -> standard HF adapter (or model) directory",
                       description="Convert a training checkpoint (OUTPUT/checkpoints/step-N or OUTPUT/final) "
                       "into a standard Hugging Face directory: a PEFT adapter dir for LoRA runs, a full model "
                       "dir for full fine-tuning. Like `xtuner convert pth_to_hf`.")
    p.add_argument("checkpoint")
    p.add_argument("out")

    p = sub.add_parser("merge", help="base + LoRA adapter -> full HF model directory",
                       description="Merge a LoRA adapter into its base model and save a standard HF model "
                       "directory (safetensors shards + tokenizer) that loads with AutoModelForCausalLM.")
    p.add_argument("source", help="a training checkpoint / exported adapter dir (its base is read from "
                   "meta.json / adapter_config.json), or a base model dir together with --adapter")
    p.add_argument("out")
    p.add_argument("--adapter", help="adapter dir, when SOURCE is the base model dir")
    p.add_argument("--max-shard-size", default="2GB", help="shard size of the saved weights (default 2GB)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="dtype of the merged weights (default float32)")

    p = sub.add_parser("chat", help="chat with a model in the terminal (streaming)",
                       description="Multi-turn chat with streaming output. In-chat commands: /reset, "
                       "/system TEXT, /exit (and /image PATH, /audio PATH for a composed model). The prompt "
                       "template is the one used in training. When the conversation outgrows the model's context "
                       "the oldest exchanges are left out (docs/inference.md).")
    p.add_argument("model", help="model dir: base, merged, exported adapter, training checkpoint, or a composed "
                   "multimodal model")
    p.add_argument("--adapter", help="LoRA adapter dir to load on top of MODEL")
    p.add_argument("--system", help="system prompt")
    p.add_argument("--template", default="auto", help="chat template (default: the one saved with the model)")
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--top-p", type=float, default=0.9)
    p.add_argument("--top-k", type=int, default=0, help="sample from the k most likely tokens only (0: all)")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--seed", type=int, help="seed of the sampling: the same conversation gives the same replies")
    p.add_argument("--image", action="append", default=[], metavar="PATH",
                   help="image for the first message (composed multimodal models; in chat: /image PATH)")
    p.add_argument("--audio", action="append", default=[], metavar="PATH",
                   help="16 kHz wav/flac for the first message (in chat: /audio PATH)")

    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server (/v1/chat/completions, /v1/models)",
                       description="Serve MODEL with an OpenAI-compatible API, streaming and not, with image/audio "
                       "content parts for composed multimodal models. Binds 127.0.0.1 unless --host says otherwise.")
    from .serve.openai_server import add_arguments as _serve_args

    _serve_args(p)

    p = sub.add_parser("web", help="web UI: chat (text, image, audio), start/stop training, reports",
                       description="A browser UI (gradio) with a chat tab, a training tab with live charts and a "
                       "clean stop, and a reports tab. Binds 127.0.0.1 unless --host says otherwise.")
    from .serve.web import add_arguments as _web_args

    _web_args(p)

    p = sub.add_parser("eval", help="evaluate a recipe's model or a checkpoint on its eval data",
                       description="Exact-match accuracy of greedy generations against the reference answers "
                       "(per task when records carry a `task` field; chain-of-thought answers by the text after "
                       "data.answer_marker). DPO recipes also report the held-out preference accuracy and reward "
                       "margin against the starting model, and score exact match on the chosen answers. Encoder "
                       "recipes report accuracy / F1 / EM / Spearman as fits the task.")
    p.add_argument("recipe", help="recipe YAML or shipped name (its data.eval_sources are used)")
    _add_overrides(p)
    p.add_argument("--checkpoint", help="checkpoint or model dir to evaluate (default: OUTPUT/final)")
    p.add_argument("--max-new-tokens", type=int, default=32)

    p = sub.add_parser("data", help="data tools: inspect records, check every record (for CI)",
                       description="Data tools. TARGET is a recipe (YAML file or shipped name) or a data file "
                       "(.jsonl, .ndjson, .json, .parquet, a datasets save_to_disk directory, builtin:NAME). A data "
                       "file is read with default settings: the tokenizer of --model (default builtin:tiny), the "
                       "template of --template (default auto), objective dpo when its records are preference "
                       "pairs; key=value overrides apply (e.g. data.max_length=512).")
    dsub = p.add_subparsers(dest="data_command", metavar="SUBCOMMAND")
    dsub.required = True

    def target_args(q: argparse.ArgumentParser) -> None:
        q.add_argument("target", metavar="RECIPE_OR_FILE", help="a recipe, or a data file / datasets dir / builtin:NAME")
        _add_overrides(q)
        q.add_argument("--model", metavar="DIR", help="tokenizer of this model dir or builtin name (default: the "
                       "recipe's model.path; builtin:tiny for a data file)")
        q.add_argument("--template", metavar="NAME", help="chat template: auto | chatml | llama3 | internlm2 | phi3 "
                       "(default: the recipe's data.template; auto for a data file)")

    q = dsub.add_parser("inspect", help="show parsing, templating, tokens and which carry loss",
                        formatter_class=argparse.RawDescriptionHelpFormatter,
                        description="Show, for the first N records of the first training source, the raw record, "
                        "the parsed messages, the templated text and the tokens (supervised tokens highlighted), "
                        "then the data report of all the data.",
                        epilog="exit status: 0 data report complete; 1 it stopped on a bad record (data.on_bad_record: "
                        "error, as training would); 2 the target cannot be read.\n"
                        "examples:\n  mmtune data inspect my.jsonl\n  mmtune data inspect my.jsonl --model "
                        "/models/qwen2-0.5b --template chatml -n 5\n  mmtune data inspect my.yaml")
    target_args(q)
    q.add_argument("-n", type=int, default=3, help="records to show (default 3)")
    q.add_argument("--no-color", action="store_true", help="mark supervised tokens with [[ ]] instead of colour")

    q = dsub.add_parser("check", help="read every record, count bad ones per reason (exit 1 if any)",
                        formatter_class=argparse.RawDescriptionHelpFormatter,
                        description="Read every record of every source (train and eval; every stage of a multimodal "
                        "recipe, images and audio loaded) to the end, ignoring max_records and on_bad_record, through "
                        "parsing, format, chat template, tokenizer and length policy, exactly as training does. "
                        "Prints per source the records, the usable ones and the bad ones per reason with the first "
                        "message of each. Nothing is written.",
                        epilog="exit status: 0 no bad record (or --allow-bad); 1 bad records found; 2 the target "
                        "cannot be read.\n"
                        "examples:\n  mmtune data check data/train.jsonl           # in CI\n"
                        "  mmtune data check my.yaml data.max_length=1024\n  mmtune data check mm-phi4-vision")
    target_args(q)
    q.add_argument("--allow-bad", action="store_true", help="report bad records but exit 0")

    p = sub.add_parser("config", help="list, copy and show shipped recipes", description="Shipped recipes.")
    csub = p.add_subparsers(dest="config_command", metavar="SUBCOMMAND")
    csub.required = True
    csub.add_parser("list", help="list shipped recipes with their first comment line")
    q = csub.add_parser("copy", help="copy a shipped recipe to edit it")
    q.add_argument("name")
    q.add_argument("dest")
    q = csub.add_parser("show", help="print a recipe after validation, with every default filled in")
    q.add_argument("name")
    _add_overrides(q)

    p = sub.add_parser("demo", help="the built-in end-to-end demo (SmolLM2-135M-Instruct, CPU)",
                       description="LoRA-tunes the real SmolLM2-135M-Instruct (builtin:smollm2-135m-instruct) on "
                       "two built-in skills with checkable answers (ISO dates, km -> m) and prints held-out exact match before and "
                       "after, general questions answered before and after, the general-chat loss ratio and the "
                       "time of each stage. --tiny: the 1.1M-parameter model built in code, continued "
                       "pretraining then LoRA SFT, with a report (Markdown + loss-curve PNG).")
    p.add_argument("--output", default="runs/demo", help="where to write the runs and the report")
    p.add_argument("--quick", action="store_true", help="a much shorter run (for tests; accuracy stays low)")
    p.add_argument("--multimodal", action="store_true", help="the multimodal demo (tiny encoders + staged recipe); "
                   "with --lm smollm2 composed on the real SmolLM2-135M-Instruct")
    p.add_argument("--lm", choices=("tiny", "smollm2"), default="tiny",
                   help="--multimodal: the language model the encoders are composed with (default: the tiny one, "
                   "about 7 min; smollm2: the real SmolLM2-135M-Instruct)")
    p.add_argument("--tiny", action="store_true", help="the demo on the tiny built-in model (about 4 min)")

    p = sub.add_parser("continual", help="train a sequence of tasks and measure forgetting",
                       usage="mmtune continual RECIPE [key=value ...] [--resume]\n"
                             "       mmtune continual sweep RECIPE [key=value ...] --strategies A,B+C --seeds N",
                       description="Train the tasks of RECIPE in order with its continual-learning strategy; "
                       "evaluate every task before training and after each task; write the accuracy matrix, "
                       "metrics (ACC, BWT, FWT, forgetting) and a report. `mmtune continual sweep RECIPE` runs "
                       "RECIPE once per strategy and seed and writes one report (mean ± sd table, paired "
                       "comparison with the first strategy, accuracy-matrix heatmaps, per-task curves).")
    p.add_argument("recipe", help="a recipe, or `sweep` followed by a recipe")
    _add_overrides(p)
    p.add_argument("--resume", action="store_true", help="continue after the last finished task")
    p.add_argument("--overwrite", action="store_true", help="start over even if output_dir holds a run (deleted)")
    sw = p.add_argument_group("sweep (mmtune continual sweep RECIPE ...)")
    sw.add_argument("--strategies", default=None, metavar="A,B+C",
                    help="comma-separated strategies; `+` composes (replay+lwf); settings come from the recipe's "
                    "continual.strategy.settings. Default: the recipe's own strategy")
    sw.add_argument("--seeds", type=int, default=5, help="runs per strategy, seeds train.seed .. train.seed+N-1 "
                    "(default 5)")
    sw.add_argument("--scenario", choices=["class", "task", "domain"], default=None,
                    help="digits benchmark: switch the scenario (and its standard tasks)")
    sw.add_argument("--output", default=None, help="report directory (default: TRAIN.OUTPUT_DIR-sweep)")

    _add_gguf_parsers(sub)
    return ap


def _cmd_train(args) -> int:
    if args.nproc > 1 and "LOCAL_RANK" not in os.environ:
        from .config import load_recipe
        from .distributed import launch
        from .workflows.run import check_distributed

        check_distributed(load_recipe(args.recipe, args.overrides), args.nproc)  # before starting N processes

        argv = ["train", args.recipe, *args.overrides]
        if args.resume:
            argv += ["--resume"] if args.resume is True else ["--resume", str(args.resume)]
        if args.overwrite:
            argv.append("--overwrite")
        return launch(args.nproc, argv)
    from .config import load_recipe
    from .workflows.run import run_recipe

    recipe = load_recipe(args.recipe, args.overrides)
    run_recipe(recipe, resume=args.resume, overwrite=args.overwrite)
    return 0


def _cmd_export(args) -> int:
    from .export import export_checkpoint

    out = export_checkpoint(args.checkpoint, args.out)
    print(f"exported to {out}")
    return 0


def _cmd_merge(args) -> int:
    from .export import merge_adapter

    if args.adapter:
        out = merge_adapter(args.source, args.adapter, args.out, max_shard_size=args.max_shard_size, dtype=args.dtype)
    else:
        out = merge_adapter(None, args.source, args.out, max_shard_size=args.max_shard_size, dtype=args.dtype)
    print(f"merged model written to {out}")
    return 0


def _cmd_chat(args) -> int:
    from .inference.models import load_chat_model
    from .inference.repl import run_terminal_chat
    from .inference.session import ChatSession
    from .inference.turns import ENCODER_NAMES, GenerationSettings

    model = load_chat_model(args.model, args.adapter, args.template)
    for kind, paths in (("image", args.image), ("audio", args.audio)):
        if paths and kind not in model.modalities:
            raise MMTuneError(f"{args.model} has no {ENCODER_NAMES[kind]}: --{kind} needs a composed multimodal model "
                              f"with one")
    settings = GenerationSettings(args.max_new_tokens, args.temperature, args.top_p, args.seed, top_k=args.top_k)
    run_terminal_chat(ChatSession(model, system_prompt=args.system, settings=settings), images=args.image,
                      audios=args.audio)
    return 0


def _cmd_eval(args) -> int:
    from .config import load_recipe
    from .evaluation import eval_recipe

    recipe = load_recipe(args.recipe, args.overrides)
    metrics = eval_recipe(recipe, checkpoint=args.checkpoint, max_new_tokens=args.max_new_tokens)
    for k, v in metrics.items():
        print(f"{k}: {v:.4f}" if isinstance(v, float) else f"{k}: {v}")
    return 0


def _cmd_data(args) -> int:
    from .data.inspect import load_target
    from .models.loading import load_tokenizer

    recipe = load_target(args.target, args.overrides, model=args.model, template=args.template)
    if args.data_command == "check":
        from .data.check import check_data

        tok = None if recipe.multimodal is not None else load_tokenizer(recipe.model.path)
        report = check_data(recipe, tok, progress=sys.stderr.isatty())
        print("\n".join(report.lines()))
        return 1 if report.bad.total and not args.allow_bad else 0
    from .data.inspect import inspect_result

    tok = load_tokenizer(recipe.model.path)
    result = inspect_result(recipe, tok, n=args.n, color=not args.no_color and sys.stdout.isatty())
    print(result.text)
    if result.stopped is not None:
        print(f"mmtune: data inspect stopped: {result.stopped}", file=sys.stderr)
        return 1
    return 0


def _cmd_config(args) -> int:
    import shutil
    from pathlib import Path

    import yaml

    from .config import list_recipes, load_recipe, resolve_recipe_path

    if args.config_command == "list":
        for name in list_recipes():
            first = resolve_recipe_path(name).read_text().splitlines()
            desc = next((ln.lstrip("# ").strip() for ln in first[1:] if ln.startswith("#")), "")
            print(f"{name:24s} {desc}")
        return 0
    if args.config_command == "copy":
        src = resolve_recipe_path(args.name)
        dest = Path(args.dest)
        if dest.is_dir():
            dest = dest / src.name
        if dest.exists():
            raise MMTuneError(f"{dest} already exists; choose another destination")
        shutil.copyfile(src, dest)
        print(f"copied {src.name} to {dest}; run it with: mmtune train {dest}")
        return 0
    recipe = load_recipe(args.name, args.overrides)
    print(yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False))
    return 0


def _cmd_demo(args) -> int:
    if args.multimodal:
        from .multimodal.demo import run_multimodal_demo

        run_multimodal_demo(args.output, quick=args.quick, lm=args.lm)
        return 0
    if args.tiny:
        from .demo import run_demo

        run_demo(args.output, quick=args.quick)
        return 0
    from .real_demo import run_real_demo

    run_real_demo(args.output, quick=args.quick)
    return 0


def _cmd_continual(args) -> int:
    from .config import load_recipe
    from .errors import ConfigError
    from .workflows.run import run_recipe

    if args.recipe == "sweep":
        return _cmd_continual_sweep(args)
    given = [f for f in ("strategies", "scenario", "output") if getattr(args, f) is not None]
    if given:
        raise MMTuneError(f"--{given[0]} belongs to `mmtune continual sweep RECIPE ...`")

    recipe = load_recipe(args.recipe, args.overrides)
    if recipe.resolved_workflow != "continual":
        raise ConfigError(f"{args.recipe}: `mmtune continual` runs recipes with a `continual` section; this is a "
                          f"{recipe.resolved_workflow} recipe (run it with `mmtune train {args.recipe}`)")
    run_recipe(recipe, resume=args.resume, overwrite=args.overwrite)
    return 0


def _cmd_continual_sweep(args) -> int:
    from .config import load_recipe
    from .continual.sweep import parse_strategies, table
    from .continual.sweep_report import run_sweep

    if not args.overrides:
        raise MMTuneError("mmtune continual sweep: give a recipe, e.g. "
                          "`mmtune continual sweep continual-digits --strategies replay,gem --seeds 5`")
    if args.resume:
        raise MMTuneError("mmtune continual sweep has no --resume; run it again")
    if args.seeds < 1:
        raise MMTuneError(f"--seeds {args.seeds}: give at least 1")
    name, overrides = args.overrides[0], args.overrides[1:]
    recipe = load_recipe(name, overrides)
    if recipe.continual is None:
        raise MMTuneError(f"{name} has no `continual` section (see `mmtune config copy continual-digits`)")
    strategies = parse_strategies(args.strategies) if args.strategies else [recipe.continual.strategy.label]
    seed = recipe.train.seed
    out = args.output or f"{recipe.train.output_dir.rstrip('/')}-sweep"
    res = run_sweep(name, strategies, range(seed, seed + args.seeds), out, overrides=overrides,
                    scenario=args.scenario, log=lambda s: print(s, flush=True))
    print("\n" + table(res["results"], res["meta"]["title"]))
    print(f"report: {res['report']['markdown']}")
    return 0


def _cmd_serve(args) -> int:
    from .serve.openai_server import run_from_args

    run_from_args(args)
    return 0


def _cmd_web(args) -> int:
    from .serve.web import run_from_args

    run_from_args(args)
    return 0


COMMANDS = {"serve": _cmd_serve, "web": _cmd_web, "train": _cmd_train, "export": _cmd_export, "merge": _cmd_merge, "chat": _cmd_chat, "eval": _cmd_eval,
            "data": _cmd_data, "config": _cmd_config, "demo": _cmd_demo, "continual": _cmd_continual}


# GGUF in and out (models/gguf.py, export_gguf.py).
def _add_gguf_parsers(sub) -> None:
    p = sub.add_parser("import-gguf", help="GGUF file -> HF model directory (dequantised)",
                       description="Dequantise a .gguf file (an architecture transformers reads from GGUF: llama, "
                       "qwen2, mistral-as-llama, phi3, gemma, ...) into a standard Hugging Face model directory with "
                       "its tokenizer and chat template, ready for `mmtune train` (model.path: OUT_DIR).")
    p.add_argument("gguf_file", metavar="FILE.gguf")
    p.add_argument("out", metavar="OUT_DIR")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="dtype of the saved weights (default float32)")
    p.add_argument("--overwrite", action="store_true", help="replace OUT_DIR if it is not empty")
    p = sub.add_parser("export-gguf", help="merged Llama/Qwen2 HF model dir -> GGUF file for llama.cpp / Ollama",
                       description="Write a merged (full) Llama or Qwen2-family model directory as one GGUF file "
                       "with its tokenizer and chat template, for llama.cpp and Ollama. A LoRA run: `mmtune merge` "
                       "first. Types: f32, f16 (2-D weights in F16, norms/biases F32), q8_0 (2-D weights in Q8_0).")
    p.add_argument("model", metavar="MODEL_DIR", help="HF model directory (or builtin:NAME)")
    p.add_argument("out", metavar="OUT.gguf")
    p.add_argument("--type", default="f16", choices=["f32", "f16", "q8_0"], help="weight type (default f16)")


def _cmd_import_gguf(args) -> int:
    from .export import _AtomicDir
    from .models.gguf import import_gguf

    with _AtomicDir(args.out, args.overwrite) as tmp:
        import_gguf(args.gguf_file, tmp, args.dtype, log_fn=print)
    print(f"imported to {args.out} (use it as model.path)")
    return 0


def _cmd_export_gguf(args) -> int:
    from .export_gguf import export_gguf

    export_gguf(args.model, args.out, args.type, log_fn=print)
    return 0


COMMANDS.update({"import-gguf": _cmd_import_gguf, "export-gguf": _cmd_export_gguf})


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args) or 0
    except MMTuneError as e:
        from .distributed import report_error

        report_error(e)  # under torchrun: the launcher shows which rank failed and why
        print(f"mmtune: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("mmtune: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
