"""`dictlearn export SOURCE OUT`: a checkpoint, or a folder written by SAELens, sparsify or
dictionary_learning -> an export folder (SAELens layout, dictlearn's metadata).

`dictlearn export --format circuit-tracer SOURCE... OUT`: one CLT, or per-layer transcoders (one
SOURCE per layer, in layer order, or one sweep checkpoint with `--member a,b,c`) -> a folder
circuit-tracer 0.5 loads (dictlearn.export_circuit)."""

from __future__ import annotations

from pathlib import Path

from dictlearn.cli.parsing import OneLineParser, check_output_folder, path_text
from dictlearn.errors import ConfigError

FORMATS = ("saelens", "circuit-tracer")


def main(argv: list[str]) -> int:
    p = OneLineParser(prog="dictlearn export", description="Checkpoint or outside folder -> export folder "
                      "(SAELens layout), or transcoders -> a circuit-tracer folder.")
    p.add_argument("checkpoint", type=path_text, nargs="+", metavar="SOURCE",
                   help="a dictlearn Lightning checkpoint (.ckpt), or a SAELens, sparsify or dictionary_learning "
                   "folder; with --format circuit-tracer also dictlearn export folders, one per layer in layer order")
    p.add_argument("out", type=path_text, help="export folder to write: new, empty, or a previous export "
                   "(replaced atomically); a folder holding anything else is refused")
    p.add_argument("--format", default="saelens", choices=FORMATS,
                   help="saelens (default): one dictionary, SAELens layout; circuit-tracer: a CLT or per-layer "
                   "transcoders in the layout circuit-tracer 0.5 loads (JumpReLU, BatchTopK and ReLU map; TopK does not)")
    p.add_argument("--member", default=None, help="which dictionary of a sweep's checkpoint (circuit-tracer: "
                   "several, comma-separated, one per layer in layer order)")
    p.add_argument("--hookpoint", default=None, help="which hookpoint of a sparsify run folder")
    p.add_argument("--feature-input-hook", default=None, help="circuit-tracer: the TransformerLens hook inside "
                   "blocks.<layer> the features read (default ln2.hook_normalized, the MLP input of a GPT-2)")
    p.add_argument("--feature-output-hook", default=None, help="circuit-tracer: the hook they write "
                   "(default hook_mlp_out)")
    args = p.parse_args(argv)
    if args.format == "circuit-tracer":
        return _circuit_tracer(args)
    if args.feature_input_hook or args.feature_output_hook:
        raise ConfigError("--feature-input-hook / --feature-output-hook: only with --format circuit-tracer")
    if len(args.checkpoint) != 1:
        raise ConfigError(f"SOURCE: {len(args.checkpoint)} given; the SAELens layout holds one dictionary "
                          "(several transcoders go to --format circuit-tracer)")
    source = Path(args.checkpoint[0])
    _refuse_export_folder(source, args.checkpoint[0])
    from dictlearn.export import export, is_export, load_with_config

    check_output_folder(args.out, "OUT", previous=is_export)
    if source.is_dir():  # another library's folder: its recorded model and hooks go along
        model, cfg = load_with_config(source, hookpoint=args.hookpoint)
        export(model, args.out, cfg["metadata"]["dictlearn"]["data"])
        print(f"dictlearn: {cfg['format']} folder {source} exported to {args.out}")
        return 0
    model, attrs = _from_checkpoint(source, args.member)
    export(model, args.out, attrs)
    print(f"dictlearn: export written to {args.out}")
    return 0


def _refuse_export_folder(source: Path, text: str) -> None:
    if source.is_dir():
        from dictlearn.dictionaries.readers import detect

        if detect(source) == "dictlearn":
            raise ConfigError(f"SOURCE {text}: is already a dictlearn export, not a checkpoint file "
                              "(copy it); a run's checkpoints are under its checkpoints/")


def _from_checkpoint(source: Path, member: str | None):
    """(Dictionary, its data attributes) of one checkpoint member."""
    import torch

    from dictlearn.export import load

    model = load(source, member=member)
    checkpoint = torch.load(source, map_location="cpu", weights_only=False)
    members = checkpoint.get("dictlearn_members") or {}
    record = members.get(member) if member else next(iter(members.values()), None)
    return model, (record or {}).get("data") or checkpoint.get("dictlearn_data", {})


def _circuit_tracer(args) -> int:
    from dictlearn.export import load_with_config
    from dictlearn.export_circuit import INPUT_HOOK, OUTPUT_HOOK, export_circuit_tracer, is_circuit_tracer_export

    check_output_folder(args.out, "OUT", previous=is_circuit_tracer_export)
    members = [m.strip() for m in args.member.split(",")] if args.member else [None]
    if len(members) > 1 and len(args.checkpoint) != 1:
        raise ConfigError("--member with several names: give one sweep checkpoint as SOURCE, the members in layer order")
    sources = [(args.checkpoint[0], m) for m in members] if len(members) > 1 else [(s, members[0]) for s in args.checkpoint]
    models, attrs, names = [], [], []
    for text, member in sources:
        path = Path(text)
        if path.is_dir():
            model, cfg = load_with_config(path, hookpoint=args.hookpoint)
            data = (cfg.get("metadata", {}).get("dictlearn") or {}).get("data", {})
        else:
            model, data = _from_checkpoint(path, member)
        models.append(model), attrs.append(data), names.append(f"{text}{f' member {member}' if member else ''}")
    out = export_circuit_tracer(models, args.out, attrs, names, args.feature_input_hook or INPUT_HOOK,
                                args.feature_output_hook or OUTPUT_HOOK)
    kind = "cross-layer transcoder" if len(models) == 1 and getattr(models[0], "n_layers", None) else \
        f"{len(models)} per-layer transcoder{'s' * (len(models) != 1)}"
    print(f"dictlearn: {kind} written for circuit-tracer to {out}")
    return 0
