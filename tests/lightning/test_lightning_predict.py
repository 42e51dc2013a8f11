"""predict gathers every worker's outputs into what a single-process predict returns."""
from __future__ import annotations

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

import gpu_proxy_lightning  # noqa: F401
from tests.lightning_project.models import DigitsModel, IndexedInputs, digits_tensors

pytestmark = pytest.mark.usefixtures("local_cluster")


@pytest.mark.parametrize("num_samples", [101, 64])
def test_predict_returns_each_sample_once_in_dataset_order(num_samples):
    torch.manual_seed(0)
    model = DigitsModel()
    x, _ = digits_tensors(num_samples)
    loader = DataLoader(IndexedInputs(x), batch_size=8)
    trainer = L.Trainer(strategy="remote_gpu", accelerator="cpu", devices=2, logger=False,
                        enable_progress_bar=False, enable_model_summary=False)
    predictions = trainer.predict(model, dataloaders=loader)
    expected = [model(batch) for batch in loader]
    assert len(predictions) == len(expected)
    for got, want in zip(predictions, expected):
        assert got.shape == want.shape
        torch.testing.assert_close(got, want)
    accuracy = (torch.cat(predictions).argmax(-1) == digits_tensors(num_samples)[1]).float().mean()
    assert 0.0 <= accuracy <= 1.0
    assert trainer.state.fn == "predict" and trainer.state.finished


def test_predict_accuracy_of_a_trained_model(tmp_path):
    torch.manual_seed(0)
    x, y = digits_tensors(400)
    model = DigitsModel()
    trainer = L.Trainer(strategy="remote_gpu", accelerator="cpu", devices=2, max_epochs=8, logger=False,
                        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False)
    from torch.utils.data import TensorDataset

    trainer.fit(model, DataLoader(TensorDataset(x, y), batch_size=32, shuffle=True))
    predictions = trainer.predict(model, dataloaders=DataLoader(IndexedInputs(x), batch_size=50))
    accuracy = (torch.cat(predictions).argmax(-1) == y).float().mean().item()
    assert accuracy > 0.85
