"""The `btdeploy` command line: pipeline (the main job), export, optimize, quantize, build, check, run, rank, index,
bench, serve, triton-repo, doctor."""

from __future__ import annotations

import argparse
import errno
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn, TypeAlias

from btdeploy.errors import BtDeployError
from btdeploy.hugepages import ENGINE_COMMANDS, reexec_with_hugepages
from btdeploy.signals import Terminated, sigterm_raises
from btdeploy.version import __version__


def _seq_lens_option(parser: argparse.ArgumentParser, defaults: tuple[int, ...]) -> None:
    """--seq-lens: None when not given, so that the defaults can stop at each model's length."""
    listed = ",".join(map(str, defaults))
    parser.add_argument(
        "--seq-lens",
        type=_int_list,
        default=None,
        help=f"text lengths, comma list (default: {listed}, each at most the model's length)",
    )


def _int_list(text: str) -> tuple[int, ...]:
    """Comma-separated positive integers (batch sizes, text lengths)."""
    try:
        values = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError("expected at least one integer")
    if min(values) < 1:
        raise argparse.ArgumentTypeError(f"every value must be at least 1, got {text!r}")
    return values


def _names(text: str) -> tuple[str, ...]:
    """A comma list of names (variants, precisions, flavours): blanks between commas are dropped,
    and an empty list is refused rather than read as the default (`--variants "$V"` with V unset)."""
    values = tuple(part.strip() for part in text.split(",") if part.strip())
    if not values:
        raise argparse.ArgumentTypeError(f"expected a comma list of names, got {text!r}")
    return values


def _at_least(minimum: float, kind: type = int) -> Callable[[str], float]:
    """An argparse type: a number of `kind` no smaller than `minimum` (counts, seconds)."""

    def parse(text: str) -> float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected {'a whole number' if kind is int else 'a number'}, got {text!r}"
            ) from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {text}")
        return value

    return parse


def _chosen_graph(args: argparse.Namespace) -> dict[str, Any]:
    """The load options of the graph a command runs, as `graph_options` in build_parser declares them."""
    chosen = {
        "providers": args.providers, "flavour": args.flavour, "precision": args.precision, "exact_sums": args.exact_sums
    }  # fmt: skip
    # rank runs ONNX Runtime or OpenVINO: no reference options
    return chosen | ({"device": args.device, "checkpoint": args.checkpoint} if "device" in args else {})


class _OneLineParser(argparse.ArgumentParser):
    """A usage error is one line and exit 2, like every other error (argparse prints the usage too)."""

    def error(self, message: str) -> NoReturn:
        # The line already starts "btdeploy: error:", so only a subcommand is named again.
        command = self.prog.partition(" ")[2]
        raise BtDeployError(f"{command + ': ' if command else ''}{message} (see {self.prog} --help)")

    def parse_known_args(  # type: ignore[override]
        self, args: list[str] | None = None, namespace: argparse.Namespace | None = None
    ) -> tuple[argparse.Namespace, list[str]]:
        # argparse hands a subcommand's unknown arguments up to the top parser, whose refusal
        # would then point at `btdeploy --help`: the subcommand refuses them itself.
        parsed, extra = super().parse_known_args(args, namespace)
        if extra and " " in self.prog:
            self.error(f"unrecognized arguments: {' '.join(extra)}")
        return parsed, extra


def _describe_os_error(error: OSError) -> str:
    """An OSError a user can cause (a path that is a file, a full disk, no permission) as one line."""
    where = f": {error.filename}" if error.filename else ""
    hints = {
        errno.ENOSPC: "free some space and run the command again (nothing half-written was kept)",
        errno.EACCES: "check the permissions of that path",
        errno.ENOTDIR: "a path given as a folder is a file",
        errno.EISDIR: "a path given as a file is a folder",
        errno.EEXIST: "that path exists and is in the way",
    }
    hint = hints.get(error.errno or 0, "check the path and run the command again")
    return f"{error.strerror or error}{where}: {hint}"


def _chosen_heads(args: argparse.Namespace) -> list[str] | None:
    """--heads as given, or None (every exported head) when it was left out. An empty value is
    refused rather than read as "every head": `--heads "$HEADS"` with the variable unset must not
    check or serve more than was meant."""
    from btdeploy.model.heads import parse_heads

    return None if args.heads is None else parse_heads(args.heads)


def cmd_export(args: argparse.Namespace) -> int:
    from btdeploy.export.exporter import export_heads
    from btdeploy.model.checkpoints import resolve_model
    from btdeploy.model.heads import parse_heads

    source = resolve_model(args.model, args.seed)
    export_heads(source, parse_heads(args.heads), Path(args.out), args.opset, args.split, args.exporter)
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    from btdeploy.backends.targets import SATURATING_SUMS, integer_sums
    from btdeploy.verify.check import check_export, check_options, graph_label, saturation_advice
    from btdeploy.verify.parity import format_rows

    heads = _chosen_heads(args)
    rows = check_export(
        Path(args.dir),
        heads,
        args.batch_sizes,
        args.seq_lens,
        args.backend,
        args.providers,
        args.report,
        args.flavour,
        args.precision,
        args.split,
        images=args.images,
        texts=args.texts,
        device=args.device,
        junit=args.junit,
        checkpoint=args.checkpoint,
        exact_sums=args.exact_sums,
        every_pair=args.all_pairs,
    )
    print(format_rows(rows))
    if args.backend == "onnxruntime":
        options = check_options(args.backend, args.providers, args.flavour, args.precision, exact_sums=args.exact_sums)
        if integer_sums(options) == SATURATING_SUMS:
            print(saturation_advice(graph_label(args.backend, options)))
    passed = all(row.passed for row in rows)
    print("parity PASSED" if passed else "parity FAILED")
    return 0 if passed else 1


def cmd_run(args: argparse.Namespace) -> int:
    from btdeploy.apps.run import run_request, score
    from btdeploy.backends.targets import get_target
    from btdeploy.runtime.runtime import find_head, load

    graph = _chosen_graph(args)
    get_target(args.backend).resolve(graph)  # an option the backend does not take: refused at once
    # The texts and the image are checked (and the image read) before the model loads.
    request = run_request(find_head(args.dir, args.head), Path(args.image), args.text, args.top_k)
    runtime = load(args.dir, head=args.head, backend=args.backend, **graph)
    answers = score(runtime, request)
    if args.json:
        header = {"head": runtime.manifest.head, "image": args.image, "graph": runtime.backend.description}
        print(json.dumps({**header, "answers": answers}, indent=2, ensure_ascii=False))
        return 0
    # A text's line breaks and tabs shown escaped: printed as they are, they broke its row in two.
    texts = [_one_line(answer["text"]) for answer in answers]
    width = max(len(text) for text in texts)
    print(f"{runtime.manifest.head} on {args.image} ({runtime.backend.description}):")
    for text, answer in zip(texts, answers, strict=True):
        print(f"  {text:<{width}}  {runtime.head.behaviour.answer_line(answer)}")
    return 0


def _one_line(text: str) -> str:
    return "".join(char if char.isprintable() else repr(char)[1:-1] for char in text)


def cmd_optimize(args: argparse.Namespace) -> int:
    from btdeploy.artifacts.manifest import head_folders
    from btdeploy.optimize.optimizer import optimize_head

    heads = _chosen_heads(args)
    for folder in head_folders(Path(args.dir), heads):
        optimize_head(folder, args.flavour, args.allow_partial)
    return 0


def cmd_quantize(args: argparse.Namespace) -> int:
    from btdeploy.artifacts.manifest import head_folders
    from btdeploy.quantize.quantizer import quantize_head

    heads = _chosen_heads(args)
    for folder in head_folders(Path(args.dir), heads):
        quantize_head(folder, args.precision, args.flavour, args.calib_images, args.calib_texts, args.calib_size)
    return 0


def cmd_build(args: argparse.Namespace) -> int:
    from btdeploy.artifacts.manifest import head_folders
    from btdeploy.backends.tensorrt.build import build_engine

    heads = _chosen_heads(args)
    for folder in head_folders(Path(args.dir), heads):
        build_engine(folder, args.precision, args.batch, args.seq_len, args.timing_cache, args.workspace, args.flavour)
    return 0


def cmd_doctor(args: argparse.Namespace) -> int:
    from btdeploy.apps.doctor import doctor_report

    lines, _ = doctor_report(Path(args.dir) if args.dir else None, args.polygraphy)
    print("\n".join(lines))
    return 0


# What `rank` ranks (the candidates, by option) and what it ranks them against (the query's options).
RANK_QUERIES = {"--texts": ("--image",), "--images": ("--text",), "--gallery": ("--text", "--image")}
RANK_PARTNERS = {
    source: " or ".join(f"{query} {'IMG' if query == '--image' else 'TEXT'}" for query in queries)
    for source, queries in RANK_QUERIES.items()
}
RANK_USAGE = "give --image IMG with --texts FILE, or --images DIR with --text TEXT, or --gallery FILE with either"


def cmd_rank(args: argparse.Namespace) -> int:
    from btdeploy.apps.gallery import rank_gallery
    from btdeploy.apps.rank import format_ranking, rank
    from btdeploy.model.media import image_files, read_captions

    # A mixed-up command is refused, not answered with one of its options ignored.
    given = {"--texts": args.texts, "--images": args.images, "--gallery": args.gallery}
    sources = [option for option, value in given.items() if value is not None]
    queries = [option for option, value in {"--image": args.image, "--text": args.text}.items() if value is not None]
    if len(sources) > 1:
        first, other = sources[:2]
        named = f"{other} {'DIR' if other == '--images' else 'FILE'}"
        raise BtDeployError(f"{first} goes with {RANK_PARTNERS[first]}; with {named} give {RANK_PARTNERS[other]}")
    if len(queries) != 1 or len(sources) != 1:
        if len(sources) == 1 and not queries:
            raise BtDeployError(f"{sources[0]} needs {RANK_PARTNERS[sources[0]]}")
        raise BtDeployError(RANK_USAGE)
    (source,), (query,) = sources, queries
    if query not in RANK_QUERIES[source]:
        raise BtDeployError(f"{query} does not go with {source}: {RANK_USAGE}")
    if args.text is not None and not args.text.strip():
        raise BtDeployError("--text is empty: give the words to rank the images against")
    arguments = (args.top_k, _chosen_graph(args), args.batch_size, args.backend)
    if args.gallery:
        against = Path(args.image) if args.image else args.text
        ranking = rank_gallery(Path(args.dir), Path(args.gallery), against, *arguments)
    elif args.texts:
        ranking = rank(Path(args.dir), [Path(args.image)], read_captions(Path(args.texts), "--texts"), *arguments)
    else:
        ranking = rank(Path(args.dir), image_files(Path(args.images), "--images"), [args.text], *arguments)
    if args.json:
        print(json.dumps(ranking.as_json(), indent=2))
        return 0
    print(ranking.stages)
    print(format_ranking(ranking.rows))
    return 0


def cmd_index(args: argparse.Namespace) -> int:
    from btdeploy.apps.gallery import index_images, index_texts

    if (args.images is None) == (args.texts is None):
        raise BtDeployError("give --images DIR (a gallery of images) or --texts FILE (one of captions), not both")
    index = index_images if args.images else index_texts
    source = Path(args.images or args.texts)
    report = index(Path(args.dir), source, Path(args.out), _chosen_graph(args), args.batch_size, args.backend)
    gallery = report.gallery
    print(
        f"{source}: {len(gallery.names)} {gallery.kind}(s) in {args.out} ({report.encoded} encoded, "
        f"{report.reused} reused, {report.dropped} dropped) in {report.seconds:.1f} s, by {gallery.origin.get('graph')}"
    )
    return 0


def cmd_pipeline(args: argparse.Namespace) -> int:
    from btdeploy.apps.pipeline import run_pipeline
    from btdeploy.artifacts.graph_names import parse_flavour
    from btdeploy.model.heads import parse_heads
    from btdeploy.quantize.methods import PRECISIONS

    out = Path(args.out or f"btdeploy-out/{Path(args.model).name}")
    precisions = tuple(p for p in args.precisions if p != "none")
    for precision in precisions:
        if precision not in PRECISIONS:
            raise BtDeployError(f"--precisions {precision!r}: choose from {', '.join(PRECISIONS)}, or none")
    passed = run_pipeline(
        args.model,
        out,
        args.seed,
        parse_heads(args.heads),
        precisions=precisions,
        calibration=(args.calib_images, args.calib_texts),
        calib_size=args.calib_size,
        split=args.split,
        flavours=tuple(parse_flavour(f, "--flavours") for f in args.flavours),  # type: ignore[misc]
        force=args.force,
        check_data=(args.check_images, args.check_texts),
        exporter=args.exporter,
    )
    return 0 if passed else 1


def cmd_bench(args: argparse.Namespace) -> int:
    import os
    import shlex

    from btdeploy.bench.report import write_reports
    from btdeploy.bench.runner import BenchSettings, run_bench
    from btdeploy.progress import say

    device = args.device
    if args.workload != "heads" and device == "cuda":
        engines = "ONNX Runtime or OpenVINO"
        raise BtDeployError(f"--workload {args.workload} runs {engines} on the CPU: leave out --device cuda")
    if device == "auto":
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    settings = BenchSettings(
        batch_sizes=args.batch_sizes,
        text_lengths=args.seq_lens,
        warmup=args.warmup,
        iters=None if args.seconds else args.iters,
        seconds=args.seconds,
        threads=args.threads or os.cpu_count() or 1,
        device=device,
        rotate_builds=not args.build_once,
        baselines=tuple(dict.fromkeys(args.baselines)) if args.baselines else None,
    )
    out = Path(args.out or Path(args.dir) / "bench")
    if out.exists() and not out.is_dir():  # refused now, not after minutes of timing
        raise BtDeployError(f"--out {out} is a file: give a folder for the reports")
    first_length = args.seq_lens[0] if args.seq_lens else None  # rank and serve take one length
    if args.workload != "heads" and settings.baselines is not None:
        raise BtDeployError(
            f"--baselines sets the speedups of --workload heads; --workload {args.workload} reports its own "
            "comparisons: leave --baselines out"
        )
    if args.workload == "rank":
        from btdeploy.bench.rank_workload import run_rank_bench

        run_rank_bench(
            Path(args.dir), args.captions, first_length, args.warmup, args.iters, settings.threads, out, args.variants
        )
        print((out / "rank.md").read_text())
        return 0
    if args.workload == "serve":
        from btdeploy.bench.load import DEFAULT_SERVED, run_serve_bench

        run_serve_bench(
            Path(args.dir),
            list(args.variants or DEFAULT_SERVED),
            list(args.concurrency),
            args.requests,
            first_length,
            args.captions,
            args.max_batch,
            out,
        )
        print((out / "serve.md").read_text())
        return 0
    variants = list(args.variants) if args.variants is not None else None
    heads = _chosen_heads(args)
    run = run_bench(Path(args.dir), heads, variants, settings)
    run.command = "btdeploy bench " + " ".join(shlex.quote(a) for a in args.argv)
    if run.interrupted and not run.cases:  # an empty report would replace the last run's
        kept = " (the reports already there are kept)" if (out / "results.md").exists() else ""
        say(f"no case finished: nothing written to {out}{kept}")
        return run.exit_code
    for path in write_reports(run, out):
        say(f"wrote {path}")
    print((out / "results.md").read_text())
    return run.exit_code


def cmd_serve(args: argparse.Namespace) -> int:
    from btdeploy.progress import say
    from btdeploy.serve.server import serve_export
    from btdeploy.serve.settings import ServeSettings

    address = args.address or os.environ.get("RAY_ADDRESS") or None  # as Ray's own tools read it
    if address and not args.address:  # said, or joining a cluster would surprise
        say(f"--address {address} from RAY_ADDRESS")
    settings = ServeSettings(
        export_dir=args.dir,
        heads=tuple(_chosen_heads(args) or ()),
        backend=args.backend,
        precision=args.precision,
        flavour=args.flavour,
        split=args.split,
        host=args.host,
        port=args.port,
        replicas=args.replicas,
        max_replicas=args.max_replicas,
        max_batch=args.max_batch,
        batch_wait_ms=args.batch_wait_ms,
        address=address,
        replica_cpus=args.replica_cpus,
        threads=args.threads,
        spin=args.spin,
        exact_sums=args.exact_sums,
        timeout_s=args.timeout,
        max_body_mb=args.max_body_mb,
        feature_cache=args.feature_cache,
        gallery=str(Path(args.gallery).resolve()) if args.gallery else None,  # replicas start elsewhere
    )
    return serve_export(settings)


def cmd_triton_repo(args: argparse.Namespace) -> int:
    from btdeploy.serve.triton_repo import write_repository

    heads = _chosen_heads(args)
    write_repository(Path(args.dir), Path(args.out), heads, args.backend, args.precision, args.flavour, args.max_batch)
    return 0


# The parser, a function per command. Each imports what its choices and defaults come from when
# the parser is built, so that `btdeploy --help` and the CPU path load no heavy package.
Commands: TypeAlias = "argparse._SubParsersAction[Any]"

EXPORTER_HELP = (
    "torch's ONNX exporter (default: %(default)s; dynamo is torch.export-based, the one torch keeps "
    "once its deprecated TorchScript exporter goes)"
)
CALIB_SIZE_HELP = "calibration rows: image-caption pairs, or generated rows without files (default %(default)s)"


def _add(
    commands: Commands, name: str, handler: Callable[[argparse.Namespace], int], help_text: str
) -> argparse.ArgumentParser:
    sub = commands.add_parser(name, help=help_text, description=help_text)
    sub.set_defaults(handler=handler)
    return sub


def _flavours() -> list[str]:
    from btdeploy.artifacts.graph_names import Flavour

    return [str(f) for f in Flavour]


def _precisions_of(*targets: str) -> list[str]:
    """The precisions any of `targets` runs (rank and Triton cannot run a bf16 graph; serve on openvino can)."""
    from btdeploy.artifacts.graph_names import Precision
    from btdeploy.backends.targets import TARGETS

    return [str(p) for p in Precision if any(p in TARGETS[name].precisions for name in targets)]


def _exact_sums_option(sub: argparse.ArgumentParser) -> None:
    sub.add_argument(
        "--exact-sums",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="ONNX Runtime's ort INT8 graphs: sum every integer product in 32 bits, as a CPU with VNNI or AMX "
        "does, also where this CPU's faster kernel would saturate (the default; btdeploy doctor says whether it "
        "would). --no-exact-sums: that kernel, 1.2-1.3x faster there; check the graph with it first",
    )


def _graph_options(
    sub: argparse.ArgumentParser, verb: str, precision_note: str, runs_on: tuple[str, ...] | None = None
) -> None:
    """Which graph a command runs: the same options, with the same choices, everywhere (`runs_on`:
    the targets a command runs on, where not every one; else TensorRT engines and the
    reference's --device too)."""
    from btdeploy.backends.targets import TARGETS

    engines = runs_on is None
    sub.add_argument("--providers", nargs="*", default=None, help="ONNX Runtime providers: cpu, cuda")
    sub.add_argument("--flavour", choices=_flavours(), default=None, help=f"{verb} the optimized graph of this flavour")
    _exact_sums_option(sub)
    sub.add_argument(
        "--precision",
        choices=_precisions_of(*(runs_on or TARGETS)),
        default=None,  # the backend's own default: fp32, or fp16 for TensorRT engines
        help=f"{verb} model.<flavour>.<precision>.onnx (flavour ort unless given){precision_note}"
        + (" (default: fp32; fp16 with --backend tensorrt)" if engines else " (default: fp32)"),
    )
    if engines:
        sub.add_argument(
            "--device",
            choices=["cpu", "cuda"],
            default=None,
            help="where --backend torch runs the reference model (default: cpu; fp16 needs cuda, bf16 cuda or a "
            "CPU with AVX-512 BF16 or AMX)",
        )
        sub.add_argument(
            "--checkpoint",
            type=Path,
            default=None,
            help="the checkpoint folder the heads were exported from, where it has moved since (a CI machine), "
            "for the PyTorch reference: held to the weights hash the export recorded",
        )


def _export_command(commands: Commands) -> None:
    from btdeploy.export.exporter import DEFAULT_EXPORTER, DEFAULT_OPSET, EXPORTERS
    from btdeploy.model.heads import HEADS

    export = _add(commands, "export", cmd_export, "export heads to ONNX with dynamic batch and text length")
    export.add_argument("--model", default="base", help="preset (tiny, base, large) or checkpoint folder")
    export.add_argument("--heads", default="all", help=f"all, or a comma list of {','.join(HEADS)}")
    export.add_argument("--out", required=True, help="output folder; each head goes to OUT/<head>/")
    export.add_argument(
        "--opset",
        type=int,
        default=DEFAULT_OPSET,
        help="ONNX opset of the export (default: %(default)s; optimize takes 17 or later, where ONNX has "
        "LayerNormalization)",
    )
    export.add_argument("--seed", type=int, default=0, help="seed for preset weights and missing head weights")
    export.add_argument(
        "--split", action="store_true", help="also write text.onnx, vision.onnx and fusion.onnx (split towers)"
    )
    export.add_argument("--exporter", choices=EXPORTERS, default=DEFAULT_EXPORTER, help=EXPORTER_HELP)


def _check_command(commands: Commands) -> None:
    from btdeploy.backends.targets import TARGETS
    from btdeploy.verify.check import DEFAULT_BATCH_SIZES, DEFAULT_TEXT_LENGTHS

    check = _add(commands, "check", cmd_check, "parity of exported heads against the PyTorch reference")
    check.add_argument("dir", help="export folder or one head folder")
    check.add_argument("--heads", default=None, help="comma list (default: every exported head)")
    check.add_argument("--batch-sizes", type=_int_list, default=DEFAULT_BATCH_SIZES, help="comma list (default: 1,3)")
    _seq_lens_option(check, DEFAULT_TEXT_LENGTHS)
    check.add_argument(
        "--backend", default="onnxruntime", choices=list(TARGETS), help="what runs the graph (default: %(default)s)"
    )
    _graph_options(check, "check", " at that precision's tolerances")
    check.add_argument("--report", type=Path, default=None, help="write the rows as JSON")
    check.add_argument(
        "--junit", type=Path, default=None, help="write the rows as JUnit XML, a test case per head and output (for CI)"
    )
    check.add_argument("--split", action="store_true", help="check the text, vision and fusion graphs together")
    check.add_argument(
        "--images", type=Path, default=None, help="folder of your images: check on real pairs instead of generated"
    )
    check.add_argument(
        "--texts", type=Path, default=None, help="text file, one caption per line (with --images; image k, caption k)"
    )
    check.add_argument(
        "--all-pairs",
        action="store_true",
        help="with --images/--texts: every caption with every image (captions x images rows), so itm ranks them too",
    )


def _optimize_command(commands: Commands) -> None:
    flavours = _flavours()
    optimize = _add(commands, "optimize", cmd_optimize, "fuse attention, bridge and residual add+LayerNorm, GELU")
    optimize.add_argument("dir", help="export folder or one head folder")
    optimize.add_argument(
        "--flavour",
        required=True,
        choices=flavours,
        help="graph dialect: ort (ONNX Runtime), trt, trt-compat (TensorRT)",
    )
    optimize.add_argument(
        "--allow-partial",
        action="store_true",
        help="keep a graph with fewer fused attention blocks or bridges than the head declares (default: error)",
    )
    optimize.add_argument("--heads", default=None, help="comma list (default: every exported head)")


def _quantize_command(commands: Commands) -> None:
    from btdeploy.quantize.calibration import DEFAULT_CALIB_SIZE
    from btdeploy.quantize.methods import PRECISIONS

    flavours = _flavours()

    quantize = _add(
        commands, "quantize", cmd_quantize, "write FP16 (AutoCast), INT8 (explicit Q/DQ) or dynamic INT8 graphs"
    )
    quantize.add_argument("dir", help="export folder or one head folder (optimize it first)")
    quantize.add_argument("--precision", required=True, choices=[str(p) for p in PRECISIONS], help="the graph to write")
    quantize.add_argument(
        "--flavour", choices=flavours, default="ort", help="the optimized graph it starts from (default: %(default)s)"
    )
    quantize.add_argument("--heads", default=None, help="comma list (default: every exported head)")
    quantize.add_argument("--calib-images", type=Path, default=None, help="folder of calibration images")
    quantize.add_argument("--calib-texts", type=Path, default=None, help="text file, one caption per line")
    quantize.add_argument("--calib-size", type=_at_least(1), default=DEFAULT_CALIB_SIZE, help=CALIB_SIZE_HELP)


def _build_command(commands: Commands) -> None:
    from btdeploy.backends.targets import TARGETS

    engine_precisions = [str(p) for p in TARGETS["tensorrt"].precisions]

    build = _add(commands, "build", cmd_build, "build strongly typed TensorRT engines from the trt precision graphs")
    build.add_argument("dir", help="export folder or one head folder (quantize --flavour trt first)")
    build.add_argument("--precision", required=True, choices=engine_precisions, help="the engine's precision")
    build.add_argument("--heads", default=None, help="comma list (default: every exported head)")
    build.add_argument("--batch", default=None, help="MIN:OPT:MAX (default: the head's 1:8:32)")
    build.add_argument("--seq-len", default=None, help="MIN:OPT:MAX text length (default 1:40:512)")
    build.add_argument("--timing-cache", type=Path, default=None, help="loaded if present, saved after the build")
    build.add_argument("--workspace", type=float, default=4.0, help="builder scratch memory, GB")
    build.add_argument(
        "--flavour",
        choices=sorted(str(f) for f in TARGETS["tensorrt"].flavours),
        default=None,
        help="the graph dialect to build from (default: the newest the installed TensorRT parses)",
    )


def _doctor_command(commands: Commands) -> None:
    doctor = _add(commands, "doctor", cmd_doctor, "what this machine can run, and how to install what it cannot")
    doctor.add_argument("dir", nargs="?", default=None, help="an export folder to list artifacts of")
    doctor.add_argument(
        "--polygraphy", action="store_true",
        help="print the Polygraphy command of each TensorRT graph in dir even where TensorRT cannot run",
    )  # fmt: skip


def _rank_command(commands: Commands) -> None:
    rank = _add(
        commands, "rank", cmd_rank, "rank captions against an image (or images against a caption): ITC, then ITM"
    )
    rank.add_argument("dir", help="export folder with the itm head (and itc for the first stage; --split helps)")
    rank.add_argument("--image", default=None, help="one image, ranked against --texts or a --gallery of captions")
    rank.add_argument("--texts", default=None, help="text file, one caption per line")
    rank.add_argument("--images", default=None, help="a folder of images, ranked against --text")
    rank.add_argument(
        "--gallery",
        default=None,
        help="images or captions as btdeploy index stored them, ranked against --text or --image",
    )
    rank.add_argument("--text", default=None, help="one caption, ranked against --images or --gallery")
    rank.add_argument("--top-k", type=int, default=5, help="items printed, and passed from ITC to ITM (default: 5)")
    rank.add_argument("--json", action="store_true", help="print the ranking as JSON, keyed as serve's /v1/rank")
    _ranking_runs(rank, "both heads")


def _index_command(commands: Commands) -> None:
    index = _add(
        commands, "index", cmd_index, "store the ITC embeddings of a folder's images or of captions, for rank --gallery"
    )
    index.add_argument("dir", help="export folder with the itc head's split graphs (export --heads itc,itm --split)")
    index.add_argument("--images", default=None, help="a folder of images (its own files, not its subfolders)")
    index.add_argument("--texts", default=None, help="or a text file of captions, one per line (labels to rank)")
    index.add_argument(
        "--out", required=True, help="the gallery file (.npz); one already there is updated: unchanged images kept"
    )
    _ranking_runs(index, "the itc head's tower")


def _ranking_runs(sub: argparse.ArgumentParser, what: str) -> None:
    """How rank and index run their heads: the batch, the backend and the graph."""
    from btdeploy.apps.rank import BACKENDS as RANK_BACKENDS

    sub.add_argument(
        "--batch-size", type=int, default=64, help="candidates read and scored at a time (memory stays flat)"
    )
    sub.add_argument(
        "--backend", choices=RANK_BACKENDS, default="onnxruntime", help=f"what runs {what} (default: %(default)s)"
    )
    _graph_options(sub, "run", f" for {what} (the split graphs where exported)", runs_on=RANK_BACKENDS)


def _run_command(commands: Commands) -> None:
    from btdeploy.backends.targets import TARGETS
    from btdeploy.model.heads import HEADS

    run = _add(commands, "run", cmd_run, "score texts against an image with an exported head")
    run.add_argument("dir", help="export folder or one head folder")
    run.add_argument(
        "--head", choices=list(HEADS), help="the head to run (needed when dir holds several)"
    )  # fmt: skip
    run.add_argument("--image", required=True, help="image file")
    run.add_argument("--text", action="append", required=True, help="repeat for several texts")
    run.add_argument(
        "--top-k",
        type=_at_least(1),
        default=1,
        help="the mlm head: also list the K most likely tokens for each <mask>, with their probabilities (default: 1)",
    )
    run.add_argument(
        "--json", action="store_true", help="print the answers as JSON, as the server's /v1/<head> route returns them"
    )
    run.add_argument(
        "--backend", default="onnxruntime", choices=list(TARGETS), help="what runs the graph (default: %(default)s)"
    )
    _graph_options(run, "run", ", or the engine of that precision")


def _bench_command(commands: Commands) -> None:
    from btdeploy.bench.runner import DEFAULT_TEXT_LENGTHS as DEFAULT_BENCH_TEXT_LENGTHS
    from btdeploy.bench.variants import BASELINES as BENCH_BASELINES

    bench = _add(commands, "bench", cmd_bench, "time every variant of each head side by side, interleaved")
    bench.add_argument("dir", help="export folder")
    bench.add_argument("--heads", default=None, help="comma list (default: every exported head)")
    bench.add_argument(
        "--variants",
        type=_names,
        default=None,
        help="comma list (default: all; those that cannot run are skipped). --workload serve: the variants to serve"
        " one after another, on onnxruntime or openvino (default: ort-fused,ort-int8-dynamic). --workload rank:"
        " variants whose backend runs the split towers (default: ort,ort-fused and the ort precisions exported)",
    )
    bench.add_argument("--batch-sizes", type=_int_list, default=(1, 4, 16), help="comma list (default: 1,4,16)")
    _seq_lens_option(bench, DEFAULT_BENCH_TEXT_LENGTHS)
    bench.add_argument("--threads", type=_at_least(0), default=0, help="0: every core")
    bench.add_argument("--warmup", type=_at_least(0), default=2, help="untimed runs per variant and case (default: 2)")
    amount = bench.add_mutually_exclusive_group()
    amount.add_argument("--iters", type=_at_least(1), default=10, help="interleaved rounds per case")
    amount.add_argument(
        "--seconds", type=_at_least(0.1, float), default=None, help="time per variant and case instead of --iters"
    )
    bench.add_argument(
        "--device", default="auto", choices=["auto", "cpu", "cuda"], help="auto: cuda where a GPU is visible"
    )
    bench.add_argument(
        "--build-once",
        action="store_true",
        help="build each variant once, in the order given (default: once in every position of the build"
        " order, the rounds split between the builds, because the variant built first can run slower)",
    )
    bench.add_argument(
        "--baselines",
        type=_names,
        default=None,
        help=f"variants every speedup is against, each timed in the same rounds (default: {','.join(BENCH_BASELINES)};"
        " e.g. openvino-int8 sets every variant against OpenVINO's INT8)",
    )
    bench.add_argument("--out", default=None, help="results folder (default: DIR/bench)")
    bench.add_argument(
        "--workload",
        choices=["heads", "rank", "serve"],
        default="heads",
        help="heads: every variant per shape; rank: one image against --captions captions (length: first --seq-lens);"
        " serve: btdeploy serve under load at each --concurrency",
    )
    bench.add_argument("--captions", type=_at_least(1), default=16, help="captions per image for --workload rank")
    serving = bench.add_argument_group("--workload serve: btdeploy serve under load, against btdeploy.load")
    serving.add_argument("--concurrency", type=_int_list, default=(1, 4, 16, 64), help="concurrent clients per level")
    serving.add_argument(
        "--requests", type=_at_least(1), default=16, help="requests per level: at least this, and 2x the clients"
    )
    serving.add_argument(
        "--max-batch", type=_at_least(1), default=16, help="the server's --max-batch when batching is on"
    )


def _serve_command(commands: Commands) -> None:
    from btdeploy.serve.settings import BACKENDS as SERVE_BACKENDS

    flavours = _flavours()

    serve = _add(
        commands, "serve", cmd_serve, "serve heads over HTTP (Open Inference Protocol and task endpoints) on Ray Serve"
    )
    serve.add_argument("dir", help="export folder")
    serve.add_argument("--heads", default=None, help="comma list (default: every exported head)")
    serve.add_argument(
        "--backend",
        choices=SERVE_BACKENDS,
        default="onnxruntime",
        help="what each replica runs (default: %(default)s; openvino: the plain and trt graphs, bf16 where the CPU"
        " multiplies it)",
    )
    serve.add_argument(
        "--precision",
        choices=_precisions_of(*SERVE_BACKENDS),
        default="fp32",
        help="the graphs to serve (default: fp32; bf16: openvino)",
    )
    serve.add_argument("--flavour", choices=flavours, default=None, help="serve the optimized graph of this flavour")
    _exact_sums_option(serve)
    serve.add_argument("--split", action="store_true", help="run the text, vision and fusion graphs")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s)")
    serve.add_argument("--port", type=int, default=8000, help="default: %(default)s")
    serve.add_argument("--replicas", type=int, default=1, help="replicas per head")
    serve.add_argument("--max-replicas", type=int, default=None, help="autoscale from --replicas up to this")
    serve.add_argument("--max-batch", type=int, default=16, help="requests merged into one batch (1: batching off)")
    serve.add_argument("--batch-wait-ms", type=float, default=5.0, help="how long a batch waits to fill")
    serve.add_argument(
        "--address",
        default=None,
        help="join this Ray cluster (auto, or HOST:PORT) instead of starting one (default: $RAY_ADDRESS where set)",
    )
    serve.add_argument(
        "--replica-cpus", type=float, default=None, help="CPUs Ray reserves per replica (default: shared out)"
    )
    serve.add_argument("--threads", type=int, default=None, help="threads per replica (0 or default: every core)")
    serve.add_argument(
        "--spin",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="whether the replicas' ONNX Runtime workers spin between operators (default: only when one model"
        " replica may run)",
    )
    serve.add_argument(
        "--timeout", type=float, default=30.0, help="seconds a request may wait for its answer (then 503)"
    )
    serve.add_argument("--max-body-mb", type=float, default=16.0, help="larger request bodies get 413")
    serve.add_argument("--feature-cache", type=int, default=256, help="image features the rank endpoint keeps")
    serve.add_argument(
        "--gallery", default=None, help="a gallery btdeploy index made: POST /v1/search ranks its images by caption"
    )


def _triton_repo_command(commands: Commands) -> None:
    from btdeploy.serve.triton_repo import BACKENDS as TRITON_BACKENDS

    flavours = _flavours()

    triton = _add(commands, "triton-repo", cmd_triton_repo, "write a Triton Inference Server model repository")
    triton.add_argument("dir", help="export folder")
    triton.add_argument("--out", required=True, help="repository folder to write (must not exist or be empty)")
    triton.add_argument("--heads", default=None, help="comma list (default: every exported head)")
    triton.add_argument(
        "--backend", choices=TRITON_BACKENDS, default="onnxruntime", help="Triton's backend (default: %(default)s)"
    )
    triton.add_argument(
        "--precision",
        choices=_precisions_of(*TRITON_BACKENDS),
        default="fp32",
        help="the graphs to serve (default: fp32)",
    )
    triton.add_argument("--flavour", choices=flavours, default=None, help="the optimized graph of this flavour")
    triton.add_argument(
        "--max-batch", type=_at_least(1), default=None, help="default: the head's engine profile maximum"
    )


def _pipeline_command(commands: Commands) -> None:
    from btdeploy.export.exporter import DEFAULT_EXPORTER, EXPORTERS
    from btdeploy.model.heads import HEADS
    from btdeploy.quantize.calibration import DEFAULT_CALIB_SIZE
    from btdeploy.quantize.methods import PRECISIONS

    flavours = _flavours()

    pipeline = _add(commands, "pipeline", cmd_pipeline, "the main job: export, optimize, quantize and check every head")
    pipeline.add_argument("--model", default="base", help="preset or checkpoint folder (default: base)")
    pipeline.add_argument("--heads", default="all", help=f"all, or a comma list of {','.join(HEADS)}")
    pipeline.add_argument("--out", default=None, help="default: btdeploy-out/<model>")
    pipeline.add_argument("--seed", type=int, default=0, help="seed for preset weights and missing head weights")
    pipeline.add_argument(
        "--precisions", type=_names, default=",".join(PRECISIONS), help="quantized graphs to write and check, or none"
    )
    pipeline.add_argument(
        "--split", action="store_true", help="also export and check the text, vision and fusion graphs"
    )
    pipeline.add_argument("--exporter", choices=EXPORTERS, default=DEFAULT_EXPORTER, help=EXPORTER_HELP)
    pipeline.add_argument(
        "--flavours",
        type=_names,
        default=",".join(flavours),
        help=f"graph dialects to write and check (default: {','.join(flavours)})",
    )
    pipeline.add_argument("--calib-images", type=Path, default=None, help="folder of calibration images")
    pipeline.add_argument("--calib-texts", type=Path, default=None, help="text file, one caption per line")
    pipeline.add_argument("--calib-size", type=_at_least(1), default=DEFAULT_CALIB_SIZE, help=CALIB_SIZE_HELP)
    pipeline.add_argument(
        "--check-images",
        type=Path,
        default=None,
        help="check every graph on your image-caption pairs (with --check-texts)",
    )
    pipeline.add_argument(
        "--check-texts", type=Path, default=None, help="text file, one caption per line; use pairs not calibrated on"
    )
    pipeline.add_argument(
        "--force",
        action="store_true",
        help="make every graph again, even those already in --out from the same checkpoint, data and tool versions",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = _OneLineParser(prog="btdeploy", description=__doc__)
    parser.add_argument("--version", action="version", version=f"btdeploy {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    for add_command in (
        _export_command, _check_command, _optimize_command, _quantize_command, _build_command, _doctor_command,
        _rank_command, _index_command, _run_command, _bench_command, _serve_command, _triton_repo_command,
        _pipeline_command,
    ):  # fmt: skip
        add_command(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Exit 0 on success, 1 when a check ran and failed, 2 for anything the user can fix, 130 on
    Ctrl-C, 143 on SIGTERM."""
    if argv is None and len(sys.argv) > 1 and sys.argv[1] in ENGINE_COMMANDS:
        reexec_with_hugepages(["-m", "btdeploy.cli", *sys.argv[1:]])

    def run() -> int:
        args = build_parser().parse_args(argv)
        args.argv = list(sys.argv[1:] if argv is None else argv)[1:]
        return int(args.handler(args))

    return reporting_failures(run, "btdeploy")


def reporting_failures(run: Callable[[], int | None], prog: str) -> int:
    """Run a command; a failure the user can fix is one line `<prog>: error: ...` and exit 2.
    Ctrl-C and SIGTERM unwind like any exception (staged files removed), exit 130 and 143."""
    try:
        with sigterm_raises():
            return int(run() or 0)
    except BtDeployError as error:
        print(f"{prog}: error: {error}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        # The reader of stdout is gone (`btdeploy check out | head`): nothing to report to anyone,
        # and Python's final flush of stdout would fail again, so it goes to /dev/null.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141  # 128 + SIGPIPE, what a shell reports for a command its pipe ended
    except OSError as error:
        print(f"{prog}: error: {_describe_os_error(error)}", file=sys.stderr)
        return 2
    except MemoryError:
        print(f"{prog}: error: out of memory: use a smaller batch or a machine with more memory", file=sys.stderr)
        return 2
    except Terminated:
        print(f"{prog}: terminated", file=sys.stderr)
        return 143
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130


def script_entry(main: Callable[[], int | None]) -> NoReturn:
    """The `if __name__ == "__main__"` of a script in benchmarks/: btdeploy's error contract."""
    sys.exit(reporting_failures(main, Path(sys.argv[0]).name))


if __name__ == "__main__":
    sys.exit(main())
