"""`dictlearn export CKPT OUT`: a checkpoint -> an export folder (SAELens layout)."""

from __future__ import annotations

from dictlearn.cli.parsing import OneLineParser, check_writable_file


def main(argv: list[str]) -> int:
    p = OneLineParser(prog="dictlearn export", description="Checkpoint -> export folder (SAELens layout).")
    p.add_argument("checkpoint", help="a dictlearn Lightning checkpoint (.ckpt)")
    p.add_argument("out", help="export folder to write (replaced atomically if it exists)")
    p.add_argument("--member", default=None, help="which dictionary of a sweep's checkpoint")
    args = p.parse_args(argv)
    check_writable_file(args.out, "OUT")
    import torch

    from dictlearn.export import export, load

    model = load(args.checkpoint, member=args.member)
    checkpoint = torch.load(args.checkpoint, map_location="cpu", weights_only=False)
    members = checkpoint.get("dictlearn_members") or {}
    record = members.get(args.member) if args.member else next(iter(members.values()), None)
    attrs = (record or {}).get("data") or checkpoint.get("dictlearn_data", {})
    export(model, args.out, attrs)
    print(f"dictlearn: export written to {args.out}")
    return 0
