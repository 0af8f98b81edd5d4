"""ReceiveBuffers: received tensors have exactly the announced shapes; a buffer is reused only once released."""

import threading

import torch

from sd3.distributed.buffers import ReceiveBuffers

SPECS = [(torch.float32, (3, 4, 8, 8)), (torch.bfloat16, (3, 10, 7)), (torch.float32, (3, 5)), (torch.int64, (3,))]


def test_exact_shapes_and_dtypes_in_one_aligned_buffer():
    tensors = ReceiveBuffers(torch.device("cpu")).acquire(SPECS).tensors
    assert [(t.dtype, tuple(t.shape)) for t in tensors] == SPECS
    storage = {t.untyped_storage().data_ptr() for t in tensors}
    assert len(storage) == 1 and all(t.data_ptr() % ReceiveBuffers.ALIGN == 0 for t in tensors)
    for i, t in enumerate(tensors):  # disjoint: writing one never touches another
        t.fill_(i)
    assert [t.float().mean().item() for t in tensors] == [0.0, 1.0, 2.0, 3.0]


def test_a_leased_batch_is_never_overwritten_even_when_dropped():
    pool = ReceiveBuffers(torch.device("cpu"))
    held = pool.acquire(SPECS)
    held.tensors[0].fill_(7.0)
    kept_slice = held.tensors[0][:1]
    for _ in range(5):
        fresh = pool.acquire(SPECS)
        fresh.tensors[0].fill_(-1.0)
        fresh.release()
    assert torch.all(held.tensors[0] == 7.0) and torch.all(kept_slice == 7.0)
    assert pool.leased == 1 and pool.allocated == 2  # the five others took turns in one buffer


def test_a_released_buffer_is_reused_and_release_is_idempotent():
    pool = ReceiveBuffers(torch.device("cpu"))
    first = pool.acquire(SPECS)
    ptr = first.tensors[0].data_ptr()
    first.release()
    first.release()
    assert pool.leased == 0 and len(pool.idle) == 1
    assert pool.acquire(SPECS).tensors[0].data_ptr() == ptr and pool.allocated == 1


def test_a_larger_batch_gets_a_larger_buffer_and_the_pool_stays_bounded():
    pool = ReceiveBuffers(torch.device("cpu"), keep=2)
    small = [pool.acquire(SPECS) for _ in range(3)]
    for lease in small:
        lease.release()
    assert len(pool.idle) == 2  # at most `keep` idle buffers
    big = pool.acquire([(torch.float32, (64, 64))])
    assert big.tensors[0].shape == (64, 64) and len(pool.idle) == 1  # a too-small idle buffer was dropped


def test_release_from_another_thread():
    pool = ReceiveBuffers(torch.device("cpu"))
    leases = [pool.acquire(SPECS) for _ in range(3)]
    threads = [threading.Thread(target=lease.release) for lease in leases]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert pool.leased == 0 and len(pool.idle) == 3
