"""Decompose on one group in memory: W_i = W_base + F(delta_i).

``encode_group`` turns a group's members into a base and codec arrays and measures what the
reconstruction will be, through the synthesis every reader uses (``groups.synthesize_decoded``):
the checksum of a reconstruction recorded at compression time is what ``expand`` must
reproduce. ``measure_group`` measures base and arrays computed elsewhere the same way.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace

import torch

from . import digests
from .codecs import Calibration, ExactCodec, codec_label, compute_dtype, get_codec
from .digests import Digest
from .finite import all_finite
from .groups import Synthesized, synthesize, synthesize_decoded
from .lanes import Workers, thread_buffer
from .profile import stage
from .records import ExpertGroup
from .safetensors_io import DTYPE_NAMES, tensor_bytes
from .stats import cos_from_norms, norm


@dataclass
class EncodedGroup:
    base: torch.Tensor  # in the group's dtype and shape
    arrays: dict[str, torch.Tensor]  # by codec suffix
    params: dict
    recon_digest: list[str]  # the checksum of each reconstruction
    rel_error: list[float]  # ||W - W_hat|| / ||W||
    cos: list[float]  # cosine of W_hat to W
    cos_to_base: list[float]  # cosine of W to the base
    # With a calibration: ||X (W - W_hat)ᵀ|| / ||X Wᵀ|| on the member's own inputs X (None for
    # a member the calibration does not describe).
    out_error: list[float | None] | None = None

    @property
    def limit_errors(self) -> list[float]:
        """What --max-error limits: the output error where it was measured, else the weight
        error."""
        if self.out_error is None:
            return self.rel_error
        return [o if o is not None else r
                for o, r in zip(self.out_error, self.rel_error, strict=True)]


@dataclass
class GivenEncoding:
    """A group's base and codec arrays computed elsewhere (the shared FFN and the deltas of a
    DeRS-trained model): ``compress`` stores them as they are and measures them like its own."""

    group: ExpertGroup
    base: torch.Tensor  # in the group's dtype and shape
    codec: str
    params: dict
    arrays: dict[str, torch.Tensor]  # by codec suffix, one row per member
    base_kind: str = "shared"
    # The checkpoint's members are this encoding's own synthesis (a DeRS model's checkpoint,
    # described in memory): measured as they are, not synthesized again.
    synthesized: bool = False

    @property
    def label(self) -> str:
        return codec_label({"name": self.codec, "params": self.params})


RECON_BUFFERS = 3  # reconstructions in flight: one being built, the others being hashed


class NonFiniteMember(ValueError):
    """Member ``index`` of a group holds a NaN or an infinity."""

    def __init__(self, index: int) -> None:
        super().__init__(f"member {index} holds NaN or Inf")
        self.index = index


@dataclass
class _Member:
    """One member's encoding and what the writer records of it."""

    row: dict[str, torch.Tensor]
    sha: str | Future[str]  # of the reconstruction; a Future while it is hashed elsewhere
    rel_error: float
    cos: float
    cos_to_base: float
    out_error: float | None  # with a calibration that describes this member


def encode_group(members: torch.Tensor, base: torch.Tensor, dtype: str, codec: str,
                 params: dict, hash_pool: ThreadPoolExecutor | None = None,
                 device: torch.device | None = None,
                 calib: Sequence[Calibration | None] | None = None,
                 workers: Workers | None = None,
                 member_digests: Sequence[str | None] | None = None,
                 digest: Digest = digests.DEFAULT) -> EncodedGroup:
    """Encode ``[N, ...]`` members against ``base`` and measure each reconstruction.

    Members are independent: with parallel ``workers`` (on the CPU) they are encoded on the
    workers' threads, each through its own buffers and hashing its own reconstruction; else one
    at a time on this thread, the checksum of each reconstruction taken on ``hash_pool`` (if
    given) while the next member is encoded. Either way each member goes through the same
    arithmetic: the archive does not depend on the workers. Memory is the group itself plus a
    few members per worker. Reconstructions are synthesized from what the codec says decoding
    will give. ``calib``: per member, what calibrated encoders know of its inputs; the output
    error of each member it describes is measured too. The arrays come back on the CPU.
    ``member_digests``: per member, the checksum of its bytes where the caller took it when
    reading (a member that is a whole tensor), which an exact codec's reconstruction has.
    ``digest``: the hash of the checksums (the archive's).
    """
    n_members = members.shape[0]
    flat = members.reshape(n_members, -1)
    cd = compute_dtype(dtype)
    impl = get_codec(codec)
    impl.validate(params, n_members, flat.shape[1])
    base_flat = base.reshape(-1).to(device or base.device)
    base_c = base_flat.to(cd)
    base_norm = norm(base_c)

    def one(i: int, w: torch.Tensor, delta: torch.Tensor, recon: torch.Tensor,
            hashing: ThreadPoolExecutor | None) -> _Member:
        with stage("measure"):
            w.copy_(flat[i])
            w_norm = norm(w)
            # A NaN or an infinity makes the norm non-finite: the check costs no pass of its
            # own. (So can squares that overflow: then the exact test decides.)
            if not math.isfinite(w_norm) and not all_finite(flat[i]):
                raise NonFiniteMember(i)
            d_norm = norm(torch.sub(w, base_c, out=delta))
            cos_base = _six(cos_from_norms(w_norm, base_norm, d_norm))
        if issubclass(impl, ExactCodec):
            with stage("codec"):
                row, _ = impl.encode_exact(flat[i], base_flat, dtype, params, i)
            # An exact codec's reconstruction is the member itself (its kernels are exact
            # integer maps, and expand and verify check every member against this checksum):
            # its checksum is the input's, taken when it was read, and its error is zero. No
            # synthesis, no second hash, no error pass (a fifth of --lossless's CPU on the real
            # slice).
            known = member_digests[i] if member_digests is not None else None
            if known is not None:
                sha: str | Future[str] = known
            else:
                view = tensor_bytes(flat[i])
                sha = (hashing.submit(_hex, digest, view, flat[i]) if hashing
                       else _hex(digest, view, flat[i]))
            out_error = None
            if calib is not None:
                with stage("measure"):
                    out_error = _output_error(w, flat[i], calib[i])
            return _Member(row, sha, 0.0, _six(cos_from_norms(w_norm, w_norm, 0.0)), cos_base,
                           out_error)
        with stage("codec"):
            # Codecs may overwrite ``delta`` but keep no reference to it in their rows.
            c = calib[i] if calib is not None else None
            if c is not None:  # calibrated encoders compensate the rounding of base + δ̂
                c = replace(c, base=base_c)
            row, decoded = impl.encode_member(delta, dtype, params, i, c)
        with stage("measure"):
            dense = isinstance(decoded, torch.Tensor)
            syn = synthesize_decoded(decoded, base_flat, base_c, recon)
        view = tensor_bytes(recon)
        sha = (hashing.submit(_hex, digest, view, recon) if hashing
               else _hex(digest, view, recon))
        with stage("measure"):
            if syn.kept is not None:
                r_norm, e_norm = _sparse_norms(syn, decoded.positions, base_norm, w, d_norm)
            else:
                # Back in the compute dtype, as rounded: into the dense delta's own memory (the
                # synthesis consumed it), or a copy (the reconstruction is hashed meanwhile).
                recon_c = decoded.copy_(recon) if dense else recon.to(cd, copy=True)
                r_norm = norm(recon_c)
                e_norm = norm(recon_c.sub_(w))
            out_error = _output_error(w, recon, calib[i]) if calib is not None else None
        return _Member(row, sha, _six(e_norm / w_norm if w_norm else 0.0),
                       _six(cos_from_norms(r_norm, w_norm, e_norm)), cos_base, out_error)

    if workers is not None and workers.parallel and base_flat.device.type == "cpu":
        def on_worker(i: int) -> _Member:
            n, dev = base_c.numel(), base_c.device
            return one(i, thread_buffer("w", n, cd, dev), thread_buffer("delta", n, cd, dev),
                       thread_buffer("recon", n, members.dtype), None)

        done = list(workers.map(on_worker, range(n_members)))
    else:
        w, delta = torch.empty_like(base_c), torch.empty_like(base_c)
        # A ring of reconstruction buffers: one being built while the others are hashed.
        ring = [torch.empty(flat.shape[1], dtype=members.dtype) for _ in range(RECON_BUFFERS)]
        done = []
        for i in range(n_members):
            if i >= RECON_BUFFERS and isinstance(done[i - RECON_BUFFERS].sha, Future):
                done[i - RECON_BUFFERS].sha.result()  # its buffer is free again
            done.append(one(i, w, delta, ring[i % RECON_BUFFERS], hash_pool))
    with stage("codec"):
        arrays, params = impl.combine([m.row for m in done], params, flat.shape[1])
    arrays = {k: v.cpu() for k, v in arrays.items()}
    recon_sha = [m.sha.result() if isinstance(m.sha, Future) else m.sha for m in done]
    return EncodedGroup(base, arrays, params, recon_sha, [m.rel_error for m in done],
                        [m.cos for m in done], [m.cos_to_base for m in done],
                        [m.out_error for m in done] if calib is not None else None)


def _output_error(w: torch.Tensor, recon: torch.Tensor, calib: Calibration | None
                  ) -> float | None:
    """||X (W - Ŵ)ᵀ|| / ||X Wᵀ|| from H = XᵀX: sqrt(Σ_rows e H eᵀ / Σ_rows w H wᵀ)."""
    if calib is None or not calib.fits(w.numel()):
        return None
    h = calib.hessian.to(w.device, w.dtype)
    rows = w.view(-1, h.shape[0])
    err = recon.to(w.dtype).view_as(rows) - rows
    signal = float(((rows @ h) * rows).sum())
    loss = float(((err @ h) * err).sum())
    return _six(math.sqrt(max(loss, 0.0) / signal)) if signal > 0 else 0.0


def _sparse_norms(syn: Synthesized, positions: torch.Tensor, base_norm: float, w: torch.Tensor,
                  d_norm: float) -> tuple[float, float]:
    """The norm of a reconstruction that differs from the base at a few positions only, and of
    its error: elsewhere it is the base, so its error there is the delta itself and both norms
    follow from sums over the kept positions."""
    kept_base, kept_c = syn.kept_base, syn.kept.to(syn.kept_base.dtype)
    kept_w = torch.index_select(w, 0, positions)
    r2 = base_norm**2 - norm(kept_base) ** 2 + norm(kept_c) ** 2
    e2 = d_norm**2 - norm(kept_w - kept_base) ** 2 + norm(kept_c - kept_w) ** 2
    return max(r2, 0.0) ** 0.5, max(e2, 0.0) ** 0.5


def _hex(digest: Digest, view: memoryview, keep_alive: torch.Tensor) -> str:
    del keep_alive  # held by the caller until the hash is done
    with stage("hash"):
        return digest.hex(view)


def _six(x: float) -> float:
    # Six significant digits: enough to report, and the same on every platform.
    return float(f"{x:.6g}")


def measure_group(members: torch.Tensor, given: GivenEncoding,
                  digest: Digest = digests.DEFAULT) -> EncodedGroup:
    """Synthesize every member from a given base and arrays, and measure it against
    ``members`` (the checkpoint's tensors) as ``encode_group`` measures its own encodings."""
    g, n_members = given.group, members.shape[0]
    flat = members.reshape(n_members, -1)
    impl = get_codec(given.codec)
    impl.validate(given.params, n_members, flat.shape[1])
    planned = impl.arrays(given.params, n_members, flat.shape[1], g.dtype)
    got = {k: (DTYPE_NAMES[v.dtype], tuple(v.shape)) for k, v in given.arrays.items()}
    if got != planned:
        raise ValueError(f"{given.codec} arrays {got} differ from what the codec stores: "
                         f"{planned}")
    cd = compute_dtype(g.dtype)
    base_flat = given.base.reshape(-1)
    base_c = base_flat.to(cd)
    base_norm = norm(base_c)
    shas, rel_error, cos, cos_base = [], [], [], []
    for i in range(n_members):
        if given.synthesized:  # the same bytes synthesis would give: the same figures
            w_hat = flat[i]
        else:
            rows = impl.member_rows(given.arrays, given.params, i)
            w_hat = synthesize(given.base, given.codec, given.params, rows, i, g.dtype, base_c)
        shas.append(digest.hex(tensor_bytes(w_hat)))
        w, hc = flat[i].to(cd), w_hat.to(cd)
        w_norm, e_norm = norm(w), norm(hc - w)
        cos_base.append(_six(cos_from_norms(w_norm, base_norm, norm(w - base_c))))
        rel_error.append(_six(e_norm / w_norm if w_norm else 0.0))
        cos.append(_six(cos_from_norms(norm(hc), w_norm, e_norm)))
    return EncodedGroup(given.base, given.arrays, given.params, shas, rel_error, cos, cos_base)
