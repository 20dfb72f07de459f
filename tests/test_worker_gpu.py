"""On a CUDA machine: the training runs in a child process that holds the job's CUDA context; the
worker's own processes never open one, and cancelling the job frees the GPU."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from tests.service_fixtures import DATASET, Service, descendants, pid_alive, train_spec, training_children, wait_for


def _cuda() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available() and shutil.which("nvidia-smi") is not None


pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not _cuda(), reason="needs CUDA and nvidia-smi")]


def gpu_pids() -> set[int]:
    out = subprocess.run(["nvidia-smi", "--query-compute-apps=pid", "--format=csv,noheader"],
                         capture_output=True, text=True, check=True).stdout  # fmt: skip
    return {int(x) for x in out.split() if x.strip().isdigit()}


@pytest.mark.timeout(300)
def test_cancel_frees_the_gpu(tmp_path):
    from distill.data.synthetic import make_synthetic

    data = make_synthetic(tmp_path / "data", num_train=16, num_val=4, image_size=(256, 192), num_classes=2)
    service = Service(tmp_path, "filesystem://", data)
    try:
        w = service.start_worker()
        job_id = service.submit(train_spec(DATASET, epochs=500, batch_size=8))
        service.wait_training(job_id, min_iter=5, timeout=120)
        (child,) = training_children(w)
        on_gpu = wait_for(lambda: gpu_pids() or None, 30, "a process on the GPU")
        assert child in on_gpu, (child, on_gpu)
        worker_family = ({w.pid} | set(descendants(w.pid))) - {child} - set(descendants(child))
        assert not worker_family & on_gpu, "the worker's own processes must not open a CUDA context"
        service.store.request_cancel(job_id)
        assert service.wait_end(job_id, timeout=10)["state"] == "cancelled"
        assert not pid_alive(child)
        wait_for(lambda: child not in gpu_pids(), 10, "the GPU to be freed")
    finally:
        service.close()
