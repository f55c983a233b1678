"""Weighted kNN classification on frozen features (InstDisc / DINO protocol: cosine similarity, top-k neighbours
vote with weight exp(sim/T), T = 0.07).

    python -m eval.knn --ckpt runs/demo/last.pt --train DIR_OR_BETON --val DIR_OR_BETON [--k 20] [--size 32]

Labels are class names mapped through the training set's classes (eval.labels): a query of a class the training
set lacks, and any unlabelled image, is left out and counted. The training features stream past the queries
(`KNNVotes`): memory holds the queries and their running top-k, not the N training features.
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F

from eval.features import extract, iter_features, report_undecodable
from eval.labels import align_labels
from pipeline.dataset import DataError, InstanceIndex


def _vote(sim: torch.Tensor, labels: torch.Tensor, num_classes: int, temperature: float) -> torch.Tensor:
    """sim [q,k] of the k nearest, their labels [q,k] -> predicted class [q]."""
    votes = torch.zeros(sim.shape[0], num_classes)
    votes.scatter_add_(1, labels, (sim / temperature).exp())
    return votes.argmax(1)


@torch.no_grad()
def knn_classify(train_feats: torch.Tensor, train_labels: torch.Tensor, test_feats: torch.Tensor,
                 k: int = 20, temperature: float = 0.07, chunk: int = 1024,
                 leave_one_out: bool = False) -> torch.Tensor:
    """train_feats [M,D], train_labels [M], test_feats [Q,D] -> predicted labels [Q]. leave_one_out: the queries
    are the training rows themselves (Q = M) and row i is not its own neighbour."""
    num_classes = int(train_labels.max()) + 1
    k = min(k, train_feats.shape[0] - int(leave_one_out))
    tr = F.normalize(train_feats.float(), dim=1)
    preds = []
    for s in range(0, test_feats.shape[0], chunk):
        q = F.normalize(test_feats[s:s + chunk].float(), dim=1)
        sim = q @ tr.t()
        if leave_one_out:
            rows = torch.arange(q.shape[0])
            sim[rows, s + rows] = -float("inf")
        sim, idx = sim.topk(k, dim=1)  # [q,k]
        preds.append(_vote(sim, train_labels[idx], num_classes, temperature))
    return torch.cat(preds)


def knn_top1(train_feats, train_labels, test_feats, test_labels, k: int = 20, temperature: float = 0.07,
             leave_one_out: bool = False) -> float:
    pred = knn_classify(train_feats, train_labels, test_feats, k, temperature, leave_one_out=leave_one_out)
    return 100.0 * (pred == test_labels).float().mean().item()


class KNNVotes:
    """The same weighted kNN with the training features arriving in chunks (`add`): only each query's running top-k
    (similarity, label) is kept, so memory is the queries [Q,D] plus [Q,k], whatever the number of training images.
    Ties between equal similarities may pick other neighbours than `knn_classify`."""

    def __init__(self, queries: torch.Tensor, num_classes: int, k: int = 20, temperature: float = 0.07):
        self.q = F.normalize(queries.float(), dim=1)
        self.k, self.temperature, self.num_classes = k, temperature, num_classes
        self.sim = torch.full((self.q.shape[0], 0), -float("inf"))
        self.labels = torch.zeros((self.q.shape[0], 0), dtype=torch.int64)
        self.neighbours = 0  # training images seen

    @torch.no_grad()
    def add(self, feats: torch.Tensor, labels: torch.Tensor) -> None:
        sim = torch.cat([self.sim, self.q @ F.normalize(feats.float(), dim=1).t()], dim=1)
        lab = torch.cat([self.labels, labels.to(torch.int64).expand(self.q.shape[0], -1)], dim=1)
        self.sim, idx = sim.topk(min(self.k, sim.shape[1]), dim=1)
        self.labels = lab.gather(1, idx)
        self.neighbours += feats.shape[0]

    def predict(self) -> torch.Tensor:
        return _vote(self.sim, self.labels, self.num_classes, self.temperature)


def knn_evaluate(fn, train: InstanceIndex, queries: InstanceIndex, size: int, device: torch.device, *, k: int = 20,
                 temperature: float = 0.07, workers: int = 2, report: bool = True,
                 report_neighbours: bool = True) -> dict:
    """kNN top-1 of `queries` against the labelled images of `train`, labels by class name (eval.labels):
    {"knn_top1", "knn_queries", "knn_neighbours", "knn_left_out_unknown_class", "knn_left_out_unlabelled"}.
    What is left out is printed in one line (report=True; report_neighbours=False: not the training images'
    undecodable ones, which the caller named already). Raises DataError when nothing is left to evaluate."""
    aligned = align_labels(train.classes, queries)
    if report and (line := aligned.note(f"kNN queries of {queries.root}")):
        print(line, flush=True)
    if not len(aligned.kept):
        raise DataError(f"no image of {queries.root} has a class of the training set ({len(train.classes)} classes)")
    neighbours = (train.labels >= 0).nonzero()[0]
    if not len(neighbours):
        raise DataError(f"no image of {train.root} has a label: no neighbours")
    qf, _, qids = extract(fn, queries, size, device, workers=workers, report=report, positions=aligned.kept)
    q_labels = torch.from_numpy(aligned.labels[qids.numpy()])
    votes = KNNVotes(qf, len(train.classes), k, temperature)
    bad: list[int] = []
    for feats, ids in iter_features(fn, train, size, device, workers=workers, positions=neighbours, bad=bad):
        votes.add(feats, torch.from_numpy(train.labels[ids.numpy()]))
    if report and report_neighbours:
        report_undecodable(train, bad)
    if not votes.neighbours:
        raise DataError(f"no labelled image of {train.root} decodes: no neighbours")
    return {"knn_top1": 100.0 * (votes.predict() == q_labels).float().mean().item(), "knn_queries": len(qids),
            "knn_neighbours": votes.neighbours, "knn_left_out_unknown_class": aligned.unknown,
            "knn_left_out_unlabelled": aligned.unlabelled}


def main(argv: list[str] | None = None) -> int:
    from eval.common import eval_parser, load_backbone_fn
    from pipeline.beton import open_index

    ap = eval_parser("weighted kNN top-1 of a checkpoint's backbone", "labelled folder or .beton (the neighbours)",
                     "labelled folder or .beton (the queries; classes matched to --train's by name)")
    ap.add_argument("--k", type=int, default=20, help="neighbours")
    ap.add_argument("--temperature", type=float, default=0.07, help="vote weight exp(similarity / T)")
    args = ap.parse_args(argv)
    fn, size, device = load_backbone_fn(args)
    out = knn_evaluate(fn, open_index(args.train), open_index(args.val), size, device, k=args.k,
                       temperature=args.temperature, workers=args.workers)
    print(f"kNN top-1 (k={args.k}, T={args.temperature}): {out['knn_top1']:.2f} ({out['knn_queries']} queries, "
          f"{out['knn_neighbours']} neighbours)")
    return 0


if __name__ == "__main__":
    from eval.common import run_cli

    sys.exit(run_cli(main, sys.argv[1:]))
