"""Weighted kNN classification on frozen features (InstDisc / DINO protocol: cosine similarity, top-k neighbours
vote with weight exp(sim/T), T = 0.07).

    python -m eval.knn --ckpt runs/demo/last.pt --train DIR --val DIR [--k 20] [--size 32]
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F


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
        votes = torch.zeros(q.shape[0], num_classes)
        votes.scatter_add_(1, train_labels[idx], (sim / temperature).exp())
        preds.append(votes.argmax(1))
    return torch.cat(preds)


def knn_top1(train_feats, train_labels, test_feats, test_labels, k: int = 20, temperature: float = 0.07,
             leave_one_out: bool = False) -> float:
    pred = knn_classify(train_feats, train_labels, test_feats, k, temperature, leave_one_out=leave_one_out)
    return 100.0 * (pred == test_labels).float().mean().item()


def main(argv: list[str] | None = None) -> int:
    from eval.common import eval_parser, load_backbone_fn
    from eval.features import extract
    from pipeline.dataset import load_index

    ap = eval_parser("weighted kNN top-1 of a checkpoint's backbone", "labelled folder (the neighbours)",
                     "labelled folder (the queries)")
    ap.add_argument("--k", type=int, default=20, help="neighbours")
    ap.add_argument("--temperature", type=float, default=0.07, help="vote weight exp(similarity / T)")
    args = ap.parse_args(argv)
    fn, size, device = load_backbone_fn(args)
    ftr, ytr, _ = extract(fn, load_index(args.train), size, device, workers=args.workers)
    fva, yva, _ = extract(fn, load_index(args.val), size, device, workers=args.workers)
    print(f"kNN top-1 (k={args.k}, T={args.temperature}): {knn_top1(ftr, ytr, fva, yva, args.k, args.temperature):.2f}")
    return 0


if __name__ == "__main__":
    from eval.common import run_cli

    sys.exit(run_cli(main, sys.argv[1:]))
