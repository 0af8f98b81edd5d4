"""ReceiveBuffers: received tensors have exactly the announced shapes, and a buffer is reused only once free."""

import torch

from sd3.distributed.transport import ReceiveBuffers

SPECS = [(torch.float32, (3, 4, 8, 8)), (torch.bfloat16, (3, 10, 7)), (torch.float32, (3, 5)), (torch.int64, (3,))]


def test_exact_shapes_and_dtypes_in_one_aligned_buffer():
    tensors = ReceiveBuffers(torch.device("cpu")).tensors(SPECS)
    assert [(t.dtype, tuple(t.shape)) for t in tensors] == SPECS
    storage = {t.untyped_storage().data_ptr() for t in tensors}
    assert len(storage) == 1 and all(t.data_ptr() % ReceiveBuffers.ALIGN == 0 for t in tensors)
    for i, t in enumerate(tensors):  # disjoint: writing one never touches another
        t.fill_(i)
    assert [t.float().mean().item() for t in tensors] == [0.0, 1.0, 2.0, 3.0]


def test_a_held_batch_is_never_overwritten():
    pool = ReceiveBuffers(torch.device("cpu"))
    held = pool.tensors(SPECS)
    held[0].fill_(7.0)
    second = pool.tensors(SPECS)
    second[0].fill_(5.0)
    kept_slice = second[0][:1]  # only a view of the second batch survives
    del second
    for _ in range(5):
        fresh = pool.tensors(SPECS)
        fresh[0].fill_(-1.0)
        del fresh
    assert torch.all(held[0] == 7.0) and torch.all(kept_slice == 5.0)


def test_a_dropped_batch_frees_its_buffer_for_reuse():
    pool = ReceiveBuffers(torch.device("cpu"))
    first = pool.tensors(SPECS)
    ptr = first[0].data_ptr()
    del first
    assert pool.tensors(SPECS)[0].data_ptr() == ptr
    assert len(pool.buffers) == 1
