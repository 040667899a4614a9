"""``python -m lightning_repro.published convert IN OUT.ckpt [--format edm|uvit|dit] [--num-heads N]
[--null-row last|first|none] [--kernel NAME]``: a published checkpoint -> a converted suite checkpoint."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from . import NULL_ROWS, read_published, save_converted

_SUFFIX = {".pkl": "edm", ".pth": "uvit", ".pt": "dit"}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m lightning_repro.published")
    sub = ap.add_subparsers(dest="command", required=True)
    c = sub.add_parser("convert", help="write a published network as a suite checkpoint (torch.load weights_only)")
    c.add_argument("source", help="edm .pkl, U-ViT .pth or DiT .pt")
    c.add_argument("out", help="the converted .ckpt")
    c.add_argument("--format", choices=sorted(set(_SUFFIX.values())), help="default: from the suffix")
    c.add_argument("--num-heads", type=int, help="U-ViT / DiT attention heads (default: the released width table)")
    c.add_argument("--null-row", choices=NULL_ROWS, default="last", help="U-ViT / DiT null-class row")
    c.add_argument("--kernel", help="U-ViT / DiT sampling kernel (default vp / vp_discrete)")
    a = ap.parse_args(argv)
    fmt = a.format or _SUFFIX.get(Path(a.source).suffix)
    if fmt is None:
        ap.error(f"cannot tell the format of {a.source} from its suffix; give --format edm|uvit|dit.")
    opts = {} if fmt == "edm" else {"num_heads": a.num_heads, "null_row": a.null_row}
    if a.kernel and fmt != "edm":
        opts["kernel"] = a.kernel
    try:
        net = read_published(fmt, a.source, **opts)
        preset = save_converted(net, a.out)
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    how = ("module.load_denoiser and " if preset else "") + f"the {fmt}: reference ({fmt}:{a.out})"
    print(f"converted {a.source} ({net.info.get('arch')}, {net.precond} on {net.kernel_spec['name']}) -> {a.out}; "
          f"loadable by {how}.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
