"""`dictlearn synth`: activations from known sparse features -> an HDF5 file that also holds them."""

from __future__ import annotations

from dictlearn.cli.parsing import OneLineParser, check_writable_file


def build_parser() -> OneLineParser:
    p = OneLineParser(prog="dictlearn synth", description="Activations from known sparse features -> HDF5.")
    p.add_argument("--out", required=True, help="output HDF5 file")
    p.add_argument("--rows", type=int, default=200_000, help="tokens (rows) to write")
    p.add_argument("--d", type=int, default=64, help="activation width")
    p.add_argument("--features", type=int, default=256, help="number of true features")
    p.add_argument("--mean-active", type=float, default=4.0, help="mean active features per row")
    p.add_argument("--zipf", type=float, default=0.0, help="Zipf exponent of feature frequencies (0: uniform)")
    p.add_argument("--magnitude", default="exponential", choices=["exponential", "uniform", "lognormal"])
    p.add_argument("--magnitude-mean", type=float, default=1.0)
    p.add_argument("--noise", type=float, default=0.0, help="Gaussian noise std per dimension")
    p.add_argument("--correlation", type=float, default=0.0, help="co-firing probability of paired features")
    p.add_argument("--hierarchy", type=int, default=0, help="number of parent features with children")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--d-out", type=int, default=0,
                   help="transcoder mode: also write 'target' [rows, d_out] from the same codes through a second dictionary")
    p.add_argument("--dense-linear", type=float, default=0.0,
                   help="transcoder mode: add this times a random linear map of the input to the target")
    return p


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    check_writable_file(args.out, "--out")
    from dictlearn.data.synth import write_synth_file

    write_synth_file(
        args.out, n_rows=args.rows, d=args.d, n_features=args.features, mean_active=args.mean_active,
        zipf_exponent=args.zipf, magnitude=args.magnitude, magnitude_mean=args.magnitude_mean,
        noise_std=args.noise, correlation=args.correlation, hierarchy=args.hierarchy, seed=args.seed,
        d_out=args.d_out, dense_linear=args.dense_linear,
    )
    target = f", target 'target' [{args.d_out}] (true output features at 'features_out')" if args.d_out else ""
    print(f"dictlearn: wrote {args.rows} rows x {args.d} (key 'acts', true features at 'features'{target}) to {args.out}")
    return 0
