"""Activation offloading: the inputs of recomputing decoder layers held in host memory.

A decoder layer that recomputes in backward keeps only its input hidden states (tokens x hidden
values) from its forward to its backward; with every layer recomputing, those L inputs are what
grows with the row's length. `BoundaryOffload.checkpoint` runs torch's checkpoint under
`torch.autograd.graph.saved_tensors_hooks` (the `save_on_cpu` pattern): torch's checkpoint saves
its inputs through `save_for_backward` (both the reentrant and the non-reentrant kind), so the
pack hook sees exactly the boundary tensors, while everything saved inside the layer is the
checkpoint's own business (recomputed, never packed here).

On CUDA a packed tensor is copied into pinned host memory on a side stream, which waits for the
compute stream first (the tensor is complete) and is recorded on the tensor so the allocator does
not reuse its memory before the copy ends. In backward, unpacking layer i's input waits for its
copy back and starts the copy of layer i-1's input on the side stream, so the transfer overlaps
layer i's recompute and backward: at most two boundaries are on the GPU at a time. Elsewhere
(a CPU run) the same bookkeeping runs with plain copies, so the arithmetic is untouched and the
losses and gradients are bit-identical with and without it.

It is installed as each recomputing layer's `_gradient_checkpointing_func`, the checkpoint function
transformers' `GradientCheckpointingLayer` calls.
"""

from __future__ import annotations

import weakref
from functools import partial

import torch
from torch.utils.checkpoint import checkpoint

# Tensors smaller than this stay where they are: copying them costs more in stream bookkeeping
# than the memory they would free (position ids, masks, scalars).
MIN_OFFLOAD_BYTES = 1 << 20


class _Boundary:
    """One packed tensor: its host copy, and its device copy once fetched back."""

    __slots__ = ("host", "device", "copied", "fetched", "index", "group", "__weakref__")

    def __init__(self, group: list, index: int):
        self.group, self.index = group, index
        self.host = self.device = self.copied = self.fetched = None


class BoundaryOffload:
    """The saved-tensor hooks and the checkpoint function that moves boundaries to the host.

    `min_bytes`: tensors smaller than this are kept as they are (tests set 0 to offload
    everything on the tiny model)."""

    def __init__(self, min_bytes: int = MIN_OFFLOAD_BYTES):
        self.min_bytes = min_bytes
        self._stream = None
        self._boundaries: list[weakref.ref] = []  # this forward's boundaries, in order
        self.packed = 0  # boundaries moved to the host so far (for tests and logs)
        self.prefetched = 0  # boundaries whose copy back started before they were asked for

    # -- the checkpoint function transformers calls ----------------------------------------

    def checkpoint(self, function, *args, **kwargs):
        with torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack):
            return checkpoint(function, *args, **kwargs)

    def checkpoint_func(self, **checkpoint_kwargs):
        """What `GradientCheckpointingLayer._gradient_checkpointing_func` takes: torch's checkpoint
        with `checkpoint_kwargs` (use_reentrant), under these hooks."""
        return partial(self.checkpoint, **checkpoint_kwargs)

    # -- hooks -----------------------------------------------------------------------------

    def _side_stream(self, device: torch.device):
        if self._stream is None:
            self._stream = torch.cuda.Stream(device)
        return self._stream

    def _pack(self, tensor: torch.Tensor):
        if tensor.numel() * tensor.element_size() < self.min_bytes:
            return tensor
        live = [b for ref in self._boundaries if (b := ref()) is not None]
        if not live or all(b.device is not None for b in live):
            self._boundaries = []  # a new forward: the last one's boundaries are all back or freed
        entry = _Boundary(self._boundaries, len(self._boundaries))
        self._boundaries.append(weakref.ref(entry))
        if tensor.device.type == "cuda":
            stream = self._side_stream(tensor.device)
            stream.wait_stream(torch.cuda.current_stream(tensor.device))
            entry.host = torch.empty(tensor.size(), dtype=tensor.dtype, pin_memory=True)
            with torch.cuda.stream(stream):
                entry.host.copy_(tensor, non_blocking=True)
                entry.copied = stream.record_event()
            tensor.record_stream(stream)
        else:
            entry.host = tensor.detach().clone()
        self.packed += 1
        return (tensor.device, entry)

    def _fetch(self, entry: _Boundary, device: torch.device) -> None:
        """Start the copy of `entry` back to `device` (on CUDA asynchronously on the side stream)."""
        if device.type == "cuda":
            stream = self._side_stream(device)
            current = torch.cuda.current_stream(device)
            out = torch.empty(entry.host.size(), dtype=entry.host.dtype, device=device)
            stream.wait_stream(current)  # `out`'s memory is free on the compute stream
            with torch.cuda.stream(stream):
                out.copy_(entry.host, non_blocking=True)
                entry.fetched = stream.record_event()
            out.record_stream(stream)
            entry.device = out
        else:
            entry.device = entry.host.to(device, copy=True)

    def _unpack(self, packed):
        if isinstance(packed, torch.Tensor):
            return packed
        device, entry = packed
        if entry.device is None:
            self._fetch(entry, device)
        if entry.fetched is not None:
            torch.cuda.current_stream(device).wait_event(entry.fetched)
        # Prefetch the boundary before this one: the next layer backward reaches.
        previous = entry.group[entry.index - 1]() if entry.index > 0 else None
        if previous is not None and previous.device is None:
            self._fetch(previous, device)
            self.prefetched += 1
        return entry.device


def install(layers, offload: BoundaryOffload, reentrant: bool = False) -> None:
    """Make each recomputing layer among `layers` checkpoint through `offload`."""
    func = offload.checkpoint_func(use_reentrant=reentrant)
    for layer in layers:
        if getattr(layer, "gradient_checkpointing", False):
            layer._gradient_checkpointing_func = func
