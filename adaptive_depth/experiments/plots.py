"""Plots for the experiments (matplotlib is imported here, never by the library)."""
from __future__ import annotations

from typing import Optional


def plot_diagnostics(diag, path: str, *, title: Optional[str] = None, top: int = 8) -> str:
    """Write a PNG of a ``Diagnostics``: rank and COI over depth, -(2/Lt) H over depth, the step profile, the top
    singular values of the representations and of the weights over depth."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    p = diag.column("depth")
    fig, ax = plt.subplots(2, 3, figsize=(15, 8))
    a = ax[0, 0]
    a.plot(p, diag.column("coi"), "o-", label="COI exact")
    a.plot(p, diag.column("coi_stable"), "s-", label=f"COI stable (g0={diag.gamma:g})")
    a.plot(p, diag.column("coi_lower"), "^-", label="COI lower bound")
    a.plot(p, diag.column("rank_threshold_centered"), "x--", label="rank (threshold, centred)")
    a.plot(p, diag.column("rank_entropy_centered"), "+--", label="rank (entropy, centred)")
    a.set_yscale("log")  # the exact COI jumps by orders of magnitude where s(A) is ill-conditioned
    a.set_xlabel("depth p"), a.set_title("rank and cost of identity (log)"), a.legend(fontsize=7)
    a = ax[0, 1]
    lt = diag.effective_depth
    if lt > 0:
        a.plot(p, [-2 / lt * h for h in diag.column("hamiltonian")], "o-", label="-(2/Lt) H(A_l, B_l)")
        hs = diag.column("hamiltonian_step")
        a.plot(p[1:], [-2 / lt * h for h in hs[1:]], "s-", label="-(2/Lt) H(A_{l-1}, B_l)")
        es = diag.column("energy_stable")
        a.plot(p[1:], [-2 / lt * e for e in es[1:]], "^--", label="-(2/Lt)(kinetic + potential), stable")
        a.plot(p, diag.column("coi"), ":", color="gray", label="COI")
        a.set_yscale("symlog", linthresh=1.0)
    a.set_xlabel("depth p"), a.set_title("Hamiltonian (symlog)"), a.legend(fontsize=7)
    a = ax[0, 2]
    layers = diag.column("layer")[1:]
    a.plot(layers, diag.column("step")[1:], "o-", label="step rho_l")
    a.set_xlabel("block l"), a.set_ylabel("rho_l"), a.set_title("step profile")
    b = a.twinx()
    b.plot(layers, diag.column("speed")[1:], "s--", color="C1", label="speed c_l")
    b.set_ylabel("relative speed c_l")
    a.legend(loc="upper left", fontsize=7), b.legend(loc="upper right", fontsize=7)
    for a, key, name in ((ax[1, 0], "rep_sv", "representations A_l"), (ax[1, 1], "weight_sv", "weights W_l")):
        rows = [(pp, sv) for pp, sv in zip(p, diag.column(key)) if sv]
        if rows:
            k = min(top, min(len(sv) for _, sv in rows))
            for i in range(k):
                a.semilogy([r[0] for r in rows], [max(r[1][i], 1e-12) for r in rows], ".-", lw=1)
        a.set_xlabel("depth p"), a.set_title(f"top {top} singular values of {name}")
    a = ax[1, 2]
    for pp, sv, lab in ((p[0], diag.layers[0].rep_sv, "A_0"), (p[len(p) // 2], diag.layers[len(p) // 2].rep_sv,
                        f"A_{len(p) // 2}"), (p[-1], diag.layers[-1].rep_sv, f"A_{len(p) - 1}")):
        a.semilogy(range(1, len(sv) + 1), [max(v, 1e-12) for v in sv], ".-", label=f"{lab} (p={pp:.2f})")
    a.set_xlabel("index"), a.set_title("spectrum of A at three depths"), a.legend(fontsize=7)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
