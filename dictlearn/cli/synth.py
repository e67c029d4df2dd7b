"""`dictlearn synth`: activations from known sparse features -> an HDF5 file that also holds them."""

from __future__ import annotations

from dictlearn.cli.parsing import OneLineParser, finite_float, path_text
from dictlearn.io import check_writable_file

# write_synth_file's argument -> the flag that sets it, so errors name what a person typed
FLAGS = {"n_rows": "--rows", "d": "--d", "n_features": "--features", "mean_active": "--mean-active",
         "zipf_exponent": "--zipf", "magnitude": "--magnitude", "magnitude_mean": "--magnitude-mean",
         "noise_std": "--noise", "correlation": "--correlation", "hierarchy": "--hierarchy", "seed": "--seed",
         "d_out": "--d-out", "dense_linear": "--dense-linear"}


def build_parser() -> OneLineParser:
    p = OneLineParser(prog="dictlearn synth", description="Activations from known sparse features -> HDF5.")
    p.add_argument("--out", type=path_text, required=True, help="output HDF5 file (a file there is replaced)")
    p.add_argument("--rows", type=int, default=200_000, help="tokens (rows) to write")
    p.add_argument("--d", type=int, default=64, help="activation width")
    p.add_argument("--features", type=int, default=256, help="number of true features")
    p.add_argument("--mean-active", type=finite_float, default=4.0, help="mean active features per row")
    p.add_argument("--zipf", type=finite_float, default=0.0, help="Zipf exponent of feature frequencies (0: uniform)")
    p.add_argument("--magnitude", default="exponential", choices=["exponential", "uniform", "lognormal"])
    p.add_argument("--magnitude-mean", type=finite_float, default=1.0)
    p.add_argument("--noise", type=finite_float, default=0.0, help="Gaussian noise std per dimension")
    p.add_argument("--correlation", type=finite_float, default=0.0, help="co-firing probability of paired features")
    p.add_argument("--hierarchy", type=int, default=0, help="number of parent features with children")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--d-out", type=int, default=0,
                   help="transcoder mode: also write 'target' [rows, d_out] from the same codes through a second dictionary")
    p.add_argument("--dense-linear", type=finite_float, default=0.0,
                   help="transcoder mode: add this times a random linear map of the input to the target")
    return p


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    params = {name: getattr(args, flag[2:].replace("-", "_")) for name, flag in FLAGS.items()}
    from dictlearn.data.synth import check_parameters, write_synth_file

    check_parameters(FLAGS, **params)  # before any work, naming the flags
    check_writable_file(args.out, "--out", example="synth.h5")
    write_synth_file(args.out, **params)
    target = f", target 'target' [{args.d_out}] (true output features at 'features_out')" if args.d_out else ""
    print(f"dictlearn: wrote {args.rows} rows x {args.d} (key 'acts', true features at 'features'{target}) to {args.out}")
    return 0
