"""Training batches prepared by data-loader worker processes: the same batches, and so the same training, whatever
their number."""
import numpy as np
import pytest
import torch


def _data():
    rng = np.random.default_rng(0)
    images = [rng.random((1, 20, 22, 24), dtype=np.float32) for _ in range(3)]
    labels = [(im[0] > 0.6).astype(np.int64) + (im[0] > 0.9) for im in images]
    return images, labels


def _batches(workers, iterations=6, seed=0):
    from segmentation.augment import augmentation
    from segmentation.train import IterationBatches, batch_loader

    images, labels = _data()
    batches = IterationBatches(images, labels, augmentation((16, 16, 16)), np.random.default_rng(seed), 2,
                               iterations, seed)
    return list(batch_loader(batches, workers))


@pytest.mark.subprocess  # data-loader worker processes
@pytest.mark.parametrize("workers", [1, 2])
def test_worker_processes_prepare_exactly_the_batches_of_the_training_loop(workers):
    serial, parallel = _batches(0), _batches(workers)
    assert len(serial) == len(parallel) == 6
    for (x0, y0, p0), (x1, y1, p1) in zip(serial, parallel):
        assert torch.equal(p0, p1) and torch.equal(x0, x1) and torch.equal(y0, y1)
    # the augmentation is random: the iterations differ, and another seed gives other batches
    assert not torch.equal(serial[0][0], serial[1][0])
    assert not all(torch.equal(a[0], b[0]) for a, b in zip(serial, _batches(0, seed=1)))


@pytest.mark.subprocess
def test_training_with_loader_workers_gives_the_same_network():
    from segmentation.network import NetworkConfig, build_network
    from segmentation.train import TrainConfig, train_network

    images, labels = _data()
    nets, curves = [], []
    for workers in (0, 2):
        torch.manual_seed(0)
        net = build_network(NetworkConfig(channels=(4, 8), strides=(2,), num_res_units=1), 1, 3)
        curves.append(train_network(net, images, labels, (16, 16, 16), TrainConfig(iterations=4),
                                    torch.device("cpu"), workers=workers))
        nets.append(net)
    assert curves[0] == curves[1]
    assert all(torch.equal(a, b) for a, b in zip(nets[0].parameters(), nets[1].parameters()))


def _workers_here(device):
    from segmentation.train import loader_workers
    return loader_workers(device)


@pytest.mark.subprocess  # a billiard pool
def test_no_loader_workers_on_the_cpu_nor_in_a_celery_child():
    """A Celery prefork child (where retraining runs) is daemonic and may not start processes: there the batches are
    made in the training loop, as on the CPU. Only the device's type is read: no GPU is needed."""
    from billiard.pool import Pool

    assert _workers_here("cpu") == 0
    assert _workers_here("cuda") >= 1
    with Pool(1) as pool:
        assert pool.map(_workers_here, ["cuda"]) == [0]


def test_batches_do_not_depend_on_the_torch_thread_count():
    """With 16 torch threads some CPU ops of the augmentation round differently from 1 thread (the last bit of most
    patches of this size): the batches are made with one thread wherever they are made, and come out the same."""
    from segmentation.augment import augmentation
    from segmentation.train import IterationBatches, batch_loader

    rng = np.random.default_rng(0)
    images = [rng.random((1, 100, 110, 110), dtype=np.float32) for _ in range(2)]
    labels = [(im[0] > 0.7).astype(np.int64) for im in images]
    before = torch.get_num_threads()
    made = []
    try:
        for threads in (1, 16):
            torch.set_num_threads(threads)
            batches = IterationBatches(images, labels, augmentation((128, 56, 48), mirror_axes=()),
                                       np.random.default_rng(0), 2, 4, 0)
            made.append(list(batch_loader(batches, 0)))
            assert torch.get_num_threads() == threads  # given back to the training loop
    finally:
        torch.set_num_threads(before)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(*made))
