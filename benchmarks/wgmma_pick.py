"""The smallest MDN_NO_WGMMA choice that made the CP op right in every log given.

    python benchmarks/wgmma_pick.py bisect_k256.log bisect_k128.log   # → stdout: the choice

Each log holds tools/check_cp_kernels_gpu.py's RESULT lines, one per --no-wgmma choice. A choice
is right in a log where no gradient is non-finite and every CP error is within 1.2× CP = 1's
(+2e-4) against float64. Prints (stderr) a table of choices × logs; stdout gets the right choice
with the fewest kernel groups ("," joined), "all" where "none" was right everywhere (a machine
where CP is right: nothing to learn, the caller validates the widest choice), nothing where no
choice was right everywhere.
"""
from __future__ import annotations

import json
import sys



def right(errors: dict) -> bool:
    return all(e["nonfinite"] == 0 and e["cp"] <= 1.2 * e["cp1"] + 2e-4 for e in errors.values())


def worst(errors: dict) -> str:
    bad = sum(e["nonfinite"] for e in errors.values())
    ratio = max(e["cp"] / max(e["cp1"], 1e-30) for e in errors.values())
    return f"{'nonfinite ' + str(bad) if bad else f'{ratio:.2f}x'}"


def main(paths) -> str:
    table: dict = {}
    order = []
    for p in paths:
        for line in open(p, errors="replace"):
            if line.startswith("RESULT "):
                r = json.loads(line[len("RESULT "):])
                c = r.get("no_wgmma", "default")
                if c not in table:
                    order.append(c)
                table.setdefault(c, {})[p] = r["errors"]
    for c in order:
        cells = [f"{'right' if right(table[c][p]) else 'WRONG'} {worst(table[c][p])}" if p in table[c]
                 else "missing" for p in paths]
        print(f"{c:32s} " + " | ".join(cells), file=sys.stderr)
    ok = [c for c in order if all(p in table[c] and right(table[c][p]) for p in paths)]
    if "none" in ok:
        print("'none' is right everywhere: CP is right on this machine", file=sys.stderr)
        return "all"
    if not ok:
        return ""

    def size(c):
        return 99 if c == "all" else len(c.replace("+", ",").split(","))
    return min(ok, key=lambda c: (size(c), order.index(c))).replace("+", ",")


if __name__ == "__main__":
    print(main(sys.argv[1:]))
