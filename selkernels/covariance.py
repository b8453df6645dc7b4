"""Streaming (mergeable) first and second moments of representations, overall or per class.

State is float64: ``count``, ``mean`` [D] and ``M2`` [D, D], the sum of outer products of the samples
centred on the running mean. Every batch is centred on its own mean before its Gram matrix is
formed (no cancellation however large the mean), then folded in with the pairwise merge of Chan,
Golub & LeVeque (1979):

    delta = mean_b - mean_a,   M2 = M2_a + M2_b + delta delta^T * n_a n_b / (n_a + n_b)

which is exact for any split of the data, so ``merge`` combines shards, ranks or epochs.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Mapping

import torch

from . import _C  # noqa: F401  (registers torch.ops.selkernels.*)
from ._moments import merge_into
from .distributed import all_reduce_moments
from .ops import LabelSegments, _check_activations, _check_label_tensor, _segment

__all__ = ["StreamingCovariance"]

_REDUCE = ("mean", "flatten")
_INT64_MAX = 2**63 - 1


def _gemm_dtype(dtype: torch.dtype) -> torch.dtype:
    # The Gram matrix of centred data runs in the input precision (float32 for half types); only
    # its accumulation into the float64 state is float64.
    return torch.float64 if dtype == torch.float64 else torch.float32


def _autocast_on(device: torch.device) -> bool:
    """Whether autocast is enabled for the device's type (which may lower the moments' GEMMs)."""
    return torch.amp.is_autocast_available(device.type) and torch.is_autocast_enabled(device.type)


def _autocast_off(device: torch.device):
    """A context in which autocast cannot lower the precision of the moments' GEMMs on device."""
    if torch.amp.is_autocast_available(device.type):
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()


def _as_samples(z: torch.Tensor, dim: int, reduce: str) -> torch.Tensor:
    """[N, D] or [N, C, *spatial] -> [M, D] rows of samples."""
    _check_activations(z, "z", require_positions=False)  # reduce decides what no positions means
    if z.shape[1] != dim:
        raise ValueError(f"z.shape[1] must equal dim={dim}, got shape {tuple(z.shape)}")
    if reduce not in _REDUCE:
        raise ValueError(f"reduce must be one of {_REDUCE}, got {reduce!r}")
    if reduce == "mean" and z.dim() > 2 and z.shape[0] > 0 and z[0, 0].numel() == 0:
        # the per-sample spatial mean over no positions is 0/0; folding it in would poison the state
        raise ValueError(
            f'z has no spatial positions (shape {tuple(z.shape)}), so reduce="mean" has no '
            'per-sample mean; pass reduce="flatten" (0 samples) or skip the batch'
        )
    z = z.detach()
    if z.dim() == 2:
        return z
    if reduce == "mean":
        return z.flatten(2).mean(-1, dtype=_gemm_dtype(z.dtype))
    return z.flatten(2).transpose(1, 2).reshape(-1, dim)


def _available_bytes(device: torch.device) -> int | None:
    """Free memory of the device, or None where it cannot be known (e.g. meta)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device.type == "cpu":
        try:
            with open("/proc/meminfo") as f:
                for line in f:
                    if line.startswith("MemAvailable:"):
                        return int(line.split()[1]) * 1024
        except OSError:
            pass
        try:
            return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            return None
    return None


def _check_class_state_fits(dim: int, num_classes: int, device: torch.device) -> None:
    """Refuse per-class state that cannot fit, before allocating it (instead of an OOM kill)."""
    need = 8 * num_classes * (dim * dim + dim + 1)
    free = _available_bytes(device)
    if free is not None and need > free:
        raise MemoryError(
            f"StreamingCovariance(dim={dim}, num_classes={num_classes}) needs num_classes * dim * dim float64 "
            f"= {need / 2**30:.2f} GiB of per-class state (M2 [K, D, D]), but only {free / 2**30:.2f} GiB are "
            f"available on {device}; use fewer classes, a smaller dim, or several accumulators over class subsets"
        )


class StreamingCovariance:
    """Running mean and covariance of D-dimensional representations, mergeable, float64 state.

    Args:
        dim: D, the number of units (features / channels).
        num_classes: if given, keep per-class moments instead: ``count`` [K], ``mean`` [K, D],
            ``M2`` [K, D, D], updated in one fused op per batch (labels required): labels sorted
            once, rows centred near their class batch mean, then each present class's Gram matrix
            computed tile by tile and Chan-merged into its D x D block in the same pass (CPU:
            register-blocked products per block of state rows, BLAS on the upper triangle's
            blocks for classes of 64+ rows; CUDA: one kernel over (class, tile) pairs, no host
            sync, no per-class launches). The cost is bounded below by reading and writing the
            float64 D x D block of every class present in the batch (``selkernels bench --filter
            covariance`` measures it).
            Memory: the state is ``8 * K * (D * D + D + 1)`` bytes, K*D*D float64 for M2 (K = 1000,
            D = 2048: 33.6 GB); the constructor raises ``MemoryError`` naming num_classes and dim
            when that exceeds the device's available memory. Each update also needs an [N, D]
            centred copy of the batch (GEMM precision) and O(min(N, K) * D) float64 temporaries.
        device: where the state lives (default CPU); updates must come from that device.
        ignore_index: per-class mode: samples with this label are skipped (as in
            :func:`selkernels.class_means`); any integer label dtype is accepted.

    ``update(z, labels=None, *, reduce="mean")`` accepts z [N, D], or z [N, C, *spatial] (C = D)
    with ``reduce="mean"`` (each sample's per-unit spatial mean is one sample, the usual choice for
    conv layers) or ``reduce="flatten"`` (every spatial position of every sample is one sample;
    per-class mode gives each position its sample's label). z is detached: statistics never take
    part in autograd. ``labels`` may also be the batch's :class:`selkernels.LabelSegments` (from
    :func:`selkernels.segment_labels`, e.g. the one the selectivity ops of the same step use): the
    labels are then not segmented again (its own ``ignore_index`` applies).

    Invalid labels (outside ``[0, num_classes)``, not ``ignore_index``): on CPU, ``update`` raises
    ``ValueError`` naming the first one before any state changes. On CUDA it makes no host sync:
    the batch is left out of the statistics (the state is unchanged by it) and the next read of the
    statistics (``count``, ``mean``, ``M2``, ``covariance``, ``correlation``, ``state_dict``,
    ``merge``, ``all_reduce``) raises the ``ValueError``, once, saying how many such labels were seen.

    Edge cases: ``covariance(ddof)`` is NaN where ``count <= ddof`` (like ``numpy.cov``);
    ``correlation()`` is NaN for units of zero variance. Absent classes have count 0, mean 0, M2 0.
    An empty batch (N = 0, or no spatial positions with ``reduce="flatten"``) changes nothing;
    ``reduce="mean"`` of z with no spatial positions raises (a sample's mean would be 0/0). NaN or
    Inf in z propagates into the statistics it touches (the class's, per class).

    Precision: ``update`` computes in float32 (float64 for float64 z) whatever the autocast state:
    inside an autocast region the Gram matrices are not lowered to bfloat16/float16.
    Memory: the state is (D^2 + D + 1) float64 per class; an update needs O(M * D) temporaries
    and the label segmentation (3 M + 2 K int64 for M sample rows).
    torch.compile(fullgraph=True, dynamic=True) traces ``update``.
    Copies: ``copy.deepcopy`` and ``pickle`` copy the state (plain tensors).
    """

    def __init__(
        self,
        dim: int,
        *,
        num_classes: int | None = None,
        device: torch.device | str | None = None,
        ignore_index: int = -100,
    ) -> None:
        if isinstance(dim, bool) or not isinstance(dim, int) or not 1 <= dim <= _INT64_MAX:
            raise ValueError(f"dim must be a positive int, got {dim!r}")
        if num_classes is not None and (
            isinstance(num_classes, bool) or not isinstance(num_classes, int) or not 1 <= num_classes <= _INT64_MAX
        ):
            raise ValueError(f"num_classes must be None or a positive int, got {num_classes!r}")
        if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
            raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
        if not -_INT64_MAX - 1 <= ignore_index <= _INT64_MAX:
            raise ValueError(f"ignore_index must fit in int64, got {ignore_index}")
        self.dim = dim
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        device = torch.device("cpu") if device is None else torch.device(device)
        if num_classes is not None:
            _check_class_state_fits(dim, num_classes, device)
        # Stored as the update op takes it, [K], [K, D], [K, D, D] (K = 1 for one set), so an update
        # passes it as is; the public views drop the class dim of one set.
        k = 1 if num_classes is None else num_classes
        f64 = dict(dtype=torch.float64, device=device)
        self._op_state = (
            torch.zeros(k, dtype=torch.int64, device=device),
            torch.zeros(k, dim, **f64),
            torch.zeros(k, dim, dim, **f64),
        )
        # Invalid labels seen on a device where update() does not sync (CUDA): raised at the next read.
        self._invalid = torch.zeros((), dtype=torch.int64, device=device)
        self._one_set_cache: LabelSegments | None = None

    def _view(self, i: int) -> torch.Tensor:
        return self._op_state[i] if self.num_classes is not None else self._op_state[i][0]

    _count = property(lambda self: self._view(0))
    _mean = property(lambda self: self._view(1))
    _m2 = property(lambda self: self._view(2))

    @property
    def device(self) -> torch.device:
        return self._invalid.device

    def _raise_invalid_labels(self) -> None:
        """The deferred label error of updates that could not check without a sync (CUDA), once."""
        if self.device.type == "cpu" or torch.compiler.is_compiling():
            return  # CPU updates raise at once; a compiled read is checked at the next eager one
        seen = int(self._invalid)
        if seen:
            self._invalid.zero_()
            raise ValueError(
                f"update() was given {seen} labels outside [0, num_classes={self.num_classes}) that are not "
                f"ignore_index={self.ignore_index}; the batches holding them were left out of the statistics"
            )

    @property
    def count(self) -> torch.Tensor:
        """Samples seen: int64 scalar tensor, or [K] per class."""
        self._raise_invalid_labels()
        return self._count

    @property
    def mean(self) -> torch.Tensor:
        """float64 [D] (or [K, D])."""
        self._raise_invalid_labels()
        return self._mean

    @property
    def M2(self) -> torch.Tensor:
        """float64 [D, D] (or [K, D, D]): sum of outer products of the centred samples."""
        self._raise_invalid_labels()
        return self._m2

    def covariance(self, ddof: int = 1) -> torch.Tensor:
        """M2 / (count - ddof), float64 [D, D] (or [K, D, D]); NaN where count <= ddof."""
        self._raise_invalid_labels()
        denom = (self._count - ddof).double()
        denom = torch.where(denom > 0, denom, torch.full_like(denom, float("nan")))
        return self._m2 / denom[..., None, None]

    def correlation(self) -> torch.Tensor:
        """Pearson correlation matrix, float64 [D, D] (or [K, D, D]); NaN for zero-variance units."""
        self._raise_invalid_labels()
        var = torch.diagonal(self._m2, dim1=-2, dim2=-1)
        inv_std = torch.where(var > 0, var.rsqrt(), torch.full_like(var, float("nan")))
        return self._m2 * inv_std[..., :, None] * inv_std[..., None, :]

    # ------------------------------------------------------------------------------------------
    def update(
        self, z: torch.Tensor, labels: torch.Tensor | LabelSegments | None = None, *, reduce: str = "mean"
    ) -> None:
        """Fold a batch in (see the class docstring for shapes and ``reduce``)."""
        device = self._invalid.device
        if _autocast_on(device):
            with _autocast_off(device):
                self._update(z, labels, reduce)
        else:
            self._update(z, labels, reduce)

    def _update(self, z: torch.Tensor, labels: torch.Tensor | LabelSegments | None, reduce: str) -> None:
        x = _as_samples(z, self.dim, reduce)
        if x.device != self.device:
            raise ValueError(f"z must be on the statistics' device ({self.device}), got {x.device}")
        if self.num_classes is None:
            if labels is not None:
                raise ValueError("labels must be None without num_classes")
            if x.shape[0] == 0:
                return
            # The one-set update is the per-class op with a single class: one fused pass (batch
            # mean, centring, symmetric product, Chan merge) on the device, no host sync.
            seg = self._one_set_segments(x.shape[0])
        else:
            seg = _per_row(self._segments(labels, z), x, z)
        torch.ops.selkernels.class_moments_update_(x.contiguous(), *seg, *self._op_state)
        if self.device.type != "cpu":  # CPU raised already; elsewhere the error waits for a read
            self._invalid += seg.invalid

    def _one_set_segments(self, rows: int) -> LabelSegments:
        """Every row in class 0. Eager updates keep the last one: batches mostly repeat their size."""
        cached = self._one_set_cache
        if cached is not None and cached.labels.shape[0] == rows and not torch.compiler.is_compiling():
            return cached
        zeros = torch.zeros(rows, dtype=torch.int64, device=self.device)
        seg = LabelSegments(*torch.ops.selkernels.segment_labels(zeros, 1, -1))
        if not torch.compiler.is_compiling():
            self._one_set_cache = seg
        return seg

    def _segments(self, labels, z: torch.Tensor) -> LabelSegments:
        """The segmentation of the batch's N samples by class, checked against z and the state."""
        if labels is None:
            raise ValueError("labels are required with num_classes")
        if isinstance(labels, LabelSegments):
            k, n = labels.counts.shape[0], labels.labels.shape[0]
            if k != self.num_classes or n != z.shape[0]:
                raise ValueError(
                    f"the label segmentation has K = {k} classes and N = {n} samples; expected "
                    f"num_classes={self.num_classes} and N = z.shape[0] = {z.shape[0]}"
                )
            device = labels.labels.device
        else:
            _check_label_tensor(labels, z.shape[0])
            device = labels.device
        if device != self.device:
            raise ValueError(f"labels must be on the statistics' device ({self.device}), got {device}")
        if isinstance(labels, LabelSegments):
            return labels
        # num_classes was checked, and its state allocated, at construction.
        return _segment(labels, self.num_classes, self.ignore_index)

    def merge(self, other: StreamingCovariance) -> StreamingCovariance:
        """Fold another accumulator's statistics into this one (exact; returns self)."""
        if not isinstance(other, StreamingCovariance):
            raise TypeError(f"other must be a StreamingCovariance, got {type(other).__name__}")
        self._raise_invalid_labels()
        other._raise_invalid_labels()
        if other.dim != self.dim or other.num_classes != self.num_classes:
            raise ValueError(
                f"other has dim={other.dim}, num_classes={other.num_classes}; expected "
                f"dim={self.dim}, num_classes={self.num_classes}"
            )
        merge_into(
            (self._count, self._mean, self._m2),
            (other._count.to(self.device), other._mean.to(self.device), other._m2.to(self.device)),
        )
        return self

    def all_reduce(self, group: torch.distributed.ProcessGroup | None = None) -> StreamingCovariance:
        """Replace these statistics by those of all ranks' samples joined, over the ranks of
        ``group`` (default: the default group); exact (Chan merge, see
        :func:`selkernels.distributed.all_reduce_moments`: two all-reduces, ``B * (D + 1)`` and
        ``B * D * D`` float64 elements, B = 1 or K). Returns self.

        Every rank must call it, and it turns local statistics into global ones: call it once on
        local statistics (e.g. at the end of an epoch). To log global statistics while each rank
        keeps accumulating its own, all-reduce a copy: ``copy.deepcopy(stats).all_reduce()``.
        With one rank (or no initialized process group) nothing changes.
        """
        self._raise_invalid_labels()
        count, mean, m2 = all_reduce_moments(self._count, self._mean, self._m2, group)
        self._count.copy_(count)
        self._mean.copy_(mean)
        self._m2.copy_(m2)
        return self

    def reset(self) -> None:
        for tensor in (*self._op_state, self._invalid):
            tensor.zero_()

    def state_dict(self) -> dict[str, object]:
        self._raise_invalid_labels()
        return {
            "dim": self.dim,
            "num_classes": self.num_classes,
            "count": self._count.clone(),
            "mean": self._mean.clone(),
            "M2": self._m2.clone(),
        }

    def load_state_dict(self, state: dict[str, object]) -> None:
        """Replace the statistics by ``state`` (from :meth:`state_dict`), validated first: a state
        that fails a check raises (naming the entry) and leaves these statistics unchanged."""
        if not isinstance(state, Mapping):
            raise TypeError(f"state must be a dict from state_dict(), got {type(state).__name__}")
        missing = [key for key in ("dim", "num_classes", "count", "mean", "M2") if key not in state]
        if missing:
            raise ValueError(f"state is missing {missing}: expected a dict from state_dict()")
        if state["dim"] != self.dim or state["num_classes"] != self.num_classes:
            raise ValueError(
                f"state has dim={state['dim']}, num_classes={state['num_classes']}; expected "
                f"dim={self.dim}, num_classes={self.num_classes}"
            )
        lead = tuple(self._count.shape)
        count = _checked_state_tensor(state, "count", lead, integer=True)
        mean = _checked_state_tensor(state, "mean", lead + (self.dim,), integer=False)
        m2 = _checked_state_tensor(state, "M2", lead + (self.dim, self.dim), integer=False)
        self._count.copy_(count)
        self._mean.copy_(mean)
        self._m2.copy_(m2)


def _checked_state_tensor(state, key: str, shape: tuple[int, ...], *, integer: bool) -> torch.Tensor:
    """state[key] if it is a tensor of exactly ``shape`` holding valid moments, else a ValueError."""
    value = state[key]
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"state[{key!r}] must be a torch.Tensor, got {type(value).__name__}")
    if tuple(value.shape) != shape:
        raise ValueError(f"state[{key!r}] must have shape {list(shape)}, got {list(value.shape)}")
    if integer:
        if value.dtype.is_floating_point or value.dtype.is_complex or value.dtype == torch.bool:
            raise TypeError(f"state[{key!r}] must be an integer tensor (sample counts), got {value.dtype}")
        if value.numel() and bool((value.long() < 0).any()):
            raise ValueError(f"state[{key!r}] must be >= 0, got {value.tolist()}")
        return value
    if not value.dtype.is_floating_point:
        raise TypeError(f"state[{key!r}] must be a floating-point tensor, got {value.dtype}")
    if value.numel() and not bool(torch.isfinite(value).all()):
        raise ValueError(f"state[{key!r}] has NaN or Inf entries: a corrupt or diverged state")
    return value


def _per_row(seg: LabelSegments, x: torch.Tensor, z: torch.Tensor) -> LabelSegments:
    """The segmentation of z's N samples as one of x's rows: with reduce="flatten" each sample is
    S = rows / N consecutive rows (n * S + s), each in its sample's class and in its sample's place
    in the order. ``invalid`` stays the count of invalid samples."""
    if x.shape[0] == z.shape[0]:
        return seg
    positions = x.shape[0] // z.shape[0]
    step = torch.arange(positions, device=x.device)
    return LabelSegments(
        seg.labels[:, None].expand(-1, positions).reshape(-1),
        seg.counts * positions,
        seg.offsets * positions,
        (seg.order[:, None] * positions + step).reshape(-1),
        seg.invalid,
    )


@torch.library.register_fake("selkernels::class_moments_update_")
def _class_moments_update_fake(z, labels, counts, offsets, order, invalid, count, mean, M2):
    return None


# Autocast policy of the per-class update: float32 (float64 for float64 z). Without it an autocast
# region would reach the kernel with autocast on, lowering its per-class GEMMs to bfloat16/float16.
for _device_type in ("cpu", "cuda"):
    torch.library.register_autocast("selkernels::class_moments_update_", _device_type, torch.float32)
