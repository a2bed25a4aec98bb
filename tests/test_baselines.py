"""The paper's baselines: LDAM (Cao et al., 2019), deferred re-weighting, post-hoc weight normalisation
(Kang et al., 2020). Each formula is checked against a hand computation from its published form."""
import json
import math
import shutil
import sys

import pytest
import torch
import torch.nn.functional as F

from conftest import REPO, TINY, TINY_EXTRA, eval_in_process, run
from la import UserError, config, losses, models, rundir

COUNTS = [5000, 500, 50]


def test_ldam_margins_scale_as_the_inverse_fourth_root_of_the_count():
    # m_y = C / n_y^(1/4) with C chosen so that the rarest class (n = 50) has the largest margin, 0.5:
    # m_y = 0.5 * (50 / n_y)^(1/4) -> 0.5 * 0.01^0.25, 0.5 * 0.1^0.25, 0.5
    m = losses.ldam_margins(COUNTS, 0.5)
    assert m.tolist() == pytest.approx([0.5 * 0.01 ** 0.25, 0.5 * 0.1 ** 0.25, 0.5], rel=1e-6)
    assert m.tolist() == pytest.approx([0.158114, 0.281171, 0.5], rel=1e-5)


def test_ldam_loss_by_hand():
    # cosines (0.2, 0.1, -0.3), scale 30, label 2 with margin 0.5: logits (6, 3, 30 * (-0.3 - 0.5) = -24)
    # loss = 24 + log(e^6 + e^3 + e^-24)
    cos = torch.tensor([[0.2, 0.1, -0.3]])
    loss = losses.ldam_loss(30 * cos, torch.tensor([2]), losses.ldam_margins(COUNTS, 0.5), 30.0)
    assert loss.item() == pytest.approx(24 + math.log(math.exp(6) + math.exp(3) + math.exp(-24)), rel=1e-6)
    # only the target's logit moves: a head-class label gets the head's small margin
    loss0 = losses.ldam_loss(30 * cos, torch.tensor([0]), losses.ldam_margins(COUNTS, 0.5), 30.0)
    m0 = 0.5 * 0.01 ** 0.25
    z0 = 30 * (0.2 - m0)
    assert loss0.item() == pytest.approx(-z0 + math.log(math.exp(z0) + math.exp(3) + math.exp(-9)), rel=1e-6)


def test_class_balanced_weights_by_hand():
    # w_y = (1 - beta) / (1 - beta^n_y), then rescaled to sum to the number of classes
    beta = 0.9999
    raw = [(1 - beta) / (1 - beta ** n) for n in COUNTS]
    expected = [3 * w / sum(raw) for w in raw]
    got = losses.class_balanced_weights(COUNTS, beta)
    assert got.tolist() == pytest.approx(expected, rel=1e-5)
    assert got.tolist() == pytest.approx([0.0341074, 0.2751672, 2.6907254], rel=1e-4)
    assert losses.class_balanced_weights(COUNTS, 0.0).tolist() == [1.0, 1.0, 1.0]  # beta = 0: no re-weighting


@pytest.mark.parametrize("name", ["ce", "la", "ldam"])
def test_drw_is_the_plain_loss_until_its_epoch_then_the_weighted_mean(name):
    g = torch.Generator().manual_seed(0)
    logits, y = torch.randn(16, 3, generator=g), torch.randint(0, 3, (16,), generator=g)
    plain = losses.Criterion(name, COUNTS)
    drw = losses.Criterion(name, COUNTS, drw_epoch=2)
    for epoch in (0, 1):
        drw.set_epoch(epoch)
        a, b = logits.clone().requires_grad_(), logits.clone().requires_grad_()
        drw(a, y).backward()
        plain(b, y).backward()
        assert torch.equal(drw(logits, y), plain(logits, y)), "bit for bit before drw_epoch"
        assert torch.equal(a.grad, b.grad), "and so is the gradient"
    drw.set_epoch(2)
    # the weighted mean sum_i w_{y_i} l_i / sum_i w_{y_i} of the plain per-image losses
    per_image = {"ce": F.cross_entropy(logits, y, reduction="none"),
                 "la": F.cross_entropy(logits + losses.log_prior(COUNTS), y, reduction="none"),
                 "ldam": F.cross_entropy(logits - 30 * losses.ldam_margins(COUNTS)[y, None] * F.one_hot(y, 3), y,
                                         reduction="none")}[name]
    w = losses.class_balanced_weights(COUNTS)[y]
    assert drw(logits, y).item() == pytest.approx(float((w * per_image).sum() / w.sum()), rel=1e-5)
    assert drw(logits, y).item() != pytest.approx(plain(logits, y).item(), rel=1e-3)


def _drw_batch():
    """A global batch of 16 whose two halves draw the tail classes unevenly (rank 0: none of class 2)."""
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(16, 5, generator=g), torch.tensor([0, 0, 1, 0, 0, 1, 0, 0, 2, 2, 2, 0, 1, 2, 0, 2])
    head = torch.nn.Linear(5, 3)
    head.load_state_dict({"weight": torch.randn(3, 5, generator=g), "bias": torch.randn(3, generator=g)})
    return x, y, head


def _drw_rank(rank, name, port, queue):
    """One of two gloo ranks: the DRW loss of its half of _drw_batch through DDP, and the averaged gradient."""
    import torch.distributed as td
    from torch.nn.parallel import DistributedDataParallel as DDP

    td.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        x, y, head = _drw_batch()
        model, criterion = DDP(head), losses.Criterion(name, COUNTS, drw_epoch=0, world_size=2)
        criterion.set_epoch(0)
        loss = criterion(model(x[8 * rank:8 * rank + 8]), y[8 * rank:8 * rank + 8])
        loss.backward()
        queue.put((rank, loss.item(), head.weight.grad.tolist(), head.bias.grad.tolist()))  # plain data: the rank exits
    finally:
        td.destroy_process_group()


@pytest.mark.parametrize("name", ["ce", "ldam"])
def test_drw_under_two_ranks_is_the_one_process_loss_and_gradient(name):
    """DDP averages the ranks' gradients: each rank's loss must be scaled by the global sum of weights, or two
    ranks would minimise the mean of two per-shard weighted means instead of the global weighted mean."""
    import multiprocessing as mp
    import socket

    x, y, head = _drw_batch()
    one = losses.Criterion(name, COUNTS, drw_epoch=0)
    one.set_epoch(0)
    loss = one(head(x), y)
    loss.backward()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    spawn = mp.get_context("spawn")
    queue = spawn.Queue()
    procs = [spawn.Process(target=_drw_rank, args=(r, name, port, queue)) for r in (0, 1)]
    for p in procs:
        p.start()
    got = sorted(queue.get(timeout=60) for _ in procs)
    for p in procs:
        p.join()
    ranks_mean = sum(g[1] for g in got) / 2  # what the meter logs: the ranks' losses averaged (equal shards)
    assert ranks_mean == pytest.approx(loss.item(), rel=1e-5)
    for rank, _, w_grad, b_grad in got:  # DDP gave both ranks the averaged gradient
        assert torch.allclose(torch.tensor(w_grad), head.weight.grad, rtol=1e-5, atol=1e-6), rank
        assert torch.allclose(torch.tensor(b_grad), head.bias.grad, rtol=1e-5, atol=1e-6), rank


def test_cosine_classifier_is_scale_times_cosine():
    head = models.CosineClassifier(4, 3, scale=30.0)
    x = torch.tensor([[1.0, 2.0, 0.0, -1.0]])
    w = head.weight.detach()
    expected = 30 * torch.tensor([[float(x[0] @ w[c] / (x[0].norm() * w[c].norm())) for c in range(3)]])
    assert torch.allclose(head(x), expected, atol=1e-5)
    assert torch.allclose(head(7 * x), head(x), atol=1e-5), "the feature norm does not matter"
    cfg = config.build(overrides=[("loss.name", "ldam")])
    assert isinstance(models.from_config(cfg, 10).fc, models.CosineClassifier)
    assert isinstance(models.from_config(config.build(), 10).fc, torch.nn.Linear)


def test_weight_normalisation_by_hand():
    # class weights of norms 2 and 1: at tau = 1 both become unit vectors, at tau = 0 the logits are phi . w
    weight = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    phi = torch.tensor([[1.0, 1.5]])
    assert losses.weight_normalized_logits(phi, weight, 0.0).tolist() == [[2.0, 1.5]]  # head wins
    assert losses.weight_normalized_logits(phi, weight, 1.0).tolist() == [[1.0, 1.5]]  # tail wins
    assert losses.weight_normalized_logits(phi, weight, 0.5)[0].tolist() == pytest.approx([2 / math.sqrt(2), 1.5])


def _ldam(root, out, *extra):
    return [REPO / "train.py", "--data-root", root, "--loss", "ldam", "--out", out, *TINY, *extra]


def test_drw_can_be_switched_at_a_resume_only_before_it_begins(fake_root, tmp_path):
    """LDAM and LDAM-DRW share their first drw_epoch epochs, so one run can branch into both: a plain LDAM
    checkpoint resumed with --drw re-weights from drw_epoch on (and so learns something else than the plain
    continuation), and is refused once a re-weighted epoch has begun under either setting."""
    plain = tmp_path / "plain"
    out = run(_ldam(fake_root, plain, "--epochs", "1"), cwd=tmp_path).stdout
    assert "loss=ldam;" in out
    shutil.copytree(plain, tmp_path / "drw")
    run(_ldam(fake_root, plain, "--epochs", "2", "--resume"), cwd=tmp_path)
    out = run(_ldam(fake_root, tmp_path / "drw", "--drw", "--set", "loss.drw_epoch=1", "--epochs", "2", "--resume"),
              cwd=tmp_path).stdout
    assert "loss=ldam-drw (re-weighted from epoch 2)" in out
    model = lambda d: torch.load(d / "checkpoint.pt", weights_only=True)["model"]
    assert not torch.equal(model(plain)["fc.weight"], model(tmp_path / "drw")["fc.weight"]), "epoch 2 was re-weighted"

    saved = config.to_dict(config.build(overrides=[("loss.name", "ldam"), ("loss.drw", True)]))  # drw_epoch 160
    branch = config.build(overrides=[("loss.name", "ldam")])
    rundir.check_resumable(branch, saved, 160)  # 160 epochs begun, none re-weighted: either way from here
    with pytest.raises(UserError, match="loss.drw=True"):
        rundir.check_resumable(branch, saved, 161)  # epoch 161 was re-weighted
    with pytest.raises(UserError, match="loss.drw_epoch=160"):
        rundir.check_resumable(config.build(overrides=[("loss.name", "ldam"), ("loss.drw", True),
                                                       ("loss.drw_epoch", 100)]), saved, 120)
    with pytest.raises(UserError, match="loss.name='ldam'"):
        rundir.check_resumable(config.build(), saved, 10)  # the loss itself never switches


@pytest.fixture(scope="module")
def sweep(fake_root, tmp_path_factory):
    """scripts/sweep_rho.sh with LOSSES="ce wnorm ldam-drw" on tiny data: a CE and an LDAM-DRW run, evaluated and
    tabulated. Returns (working directory, the script's output, its environment)."""
    cwd = tmp_path_factory.mktemp("baselines")
    env = {"DATA_ROOT": str(fake_root), "RHOS": "10", "SEEDS": "0", "EPOCHS": "1", "PYTHON": sys.executable,
           "OUT": str(cwd / "runs"), "RESULTS": str(cwd / "results"), "EXTRA": TINY_EXTRA + " --set loss.drw_epoch=0",
           "LOSSES": "ce wnorm ldam-drw"}
    return cwd, run(["bash", REPO / "scripts" / "sweep_rho.sh"], cwd=cwd, env=env, timeout=240).stdout, env


def test_sweep_script_trains_and_tabulates_the_baselines(sweep):
    cwd, out, env = sweep
    assert "sweep: cifar10, ce ldam-drw, rho 10" in out
    config = (cwd / "runs" / "rho10_ldam-drw_s0" / "config.yaml").read_text()
    assert "name: ldam" in config and "drw: true" in config
    md = (cwd / "results" / "cifar10_rho_sweep.md").read_text()
    rows = [line.split(" | ")[0] for line in md.splitlines() if line.startswith("| ") and not line.startswith("| method")]
    assert rows == ["| Baseline", "| Post-hoc adjustment", "| Weight normalisation (T = 1)", "| LDAM-DRW"]
    assert "—" not in md.split("| Baseline")[1], "every row has its run"
    report = json.loads((cwd / "runs" / "rho10_ce_s0" / "eval.json").read_text())
    assert report["method"] == "ce" and report["test"]["wnorm"]["tau"] == 1.0
    for losses_value, message in (("ce magic", "LOSSES: unknown 'magic'"), ("la wnorm", "wnorm re-evaluates the ce runs")):
        bad = run(["bash", REPO / "scripts" / "sweep_rho.sh"], cwd=cwd, check=False, env={**env, "LOSSES": losses_value})
        assert bad.returncode == 2 and message in bad.stderr


def test_eval_reports_weight_normalisation_beside_the_tau_sweep(sweep, fake_root, tmp_path):
    ce = shutil.copytree(sweep[0] / "runs" / "rho10_ce_s0", tmp_path / "ce")
    out = run([REPO / "eval.py", ce, "--tau-sweep", "--wnorm-tau", "0.5", "--data-root", fake_root], cwd=tmp_path).stdout
    assert "wnorm T=0.5" in out and "weight normalisation w_y / ||w_y||^T (no bias)" in out
    assert "T chosen on validation by rule val-acc" in out and "T tuned on test (ORACLE)" in out
    feats, logits = (torch.load(ce / f, weights_only=True) for f in ("features.pt", "logits.pt"))
    ckpt = torch.load(ce / "checkpoint.pt", weights_only=False)
    assert feats["checkpoint_sha256"] == logits["checkpoint_sha256"]
    for split in ("val", "test"):  # the cached features are what the classifier read
        phi, labels = feats["splits"][split]
        assert torch.equal(labels, logits["splits"][split][1])
        linear = phi @ ckpt["model"]["fc.weight"].T + ckpt["model"]["fc.bias"]
        assert torch.allclose(linear, logits["splits"][split][0], atol=1e-4)
    report = json.loads((ce / "eval.json").read_text())
    phi, labels = feats["splits"]["test"]
    by_hand = losses.weight_normalized_logits(phi, ckpt["model"]["fc.weight"], 0.5).argmax(1) == labels
    assert report["test"]["wnorm"]["top1"] == pytest.approx(100 * by_hand.double().mean().item())
    wnorm = report["wnorm_sweep"]
    assert wnorm["paper_default"]["tau"] == 1.0 and wnorm["validation_chosen"]["rule"] == "val-acc"
    i = wnorm["taus"].index(wnorm["oracle_test_tuned"]["tau"])
    assert wnorm["test_balanced_acc"][i] == max(wnorm["test_balanced_acc"])


def test_weight_normalisation_says_why_it_cannot_be_done(sweep, fake_root, tmp_path):
    ldam = shutil.copytree(sweep[0] / "runs" / "rho10_ldam-drw_s0", tmp_path / "ldam")
    out = run([REPO / "eval.py", ldam, "--wnorm-tau", "1", "--data-root", fake_root], cwd=tmp_path).stdout
    assert "has a cosine classifier (--loss ldam)" in out and "wnorm T=1" not in out
    code, _, err = eval_in_process([ldam, "--wnorm-tau", "-1"])
    assert code == 2 and "--wnorm-tau must be a finite number >= 0" in err
