"""Matching Networks (Vinyals et al. 2016) on Omniglot, written against torchmeta's API.

This program is written for torchmeta (``pip install torchmeta``, torch<1.10): a query is
classified by its attention over the support set, a softmax over the cosine similarities of their
embeddings summed per class (``torchmeta.utils.matching.matching_log_probas``), and trained with
the negative log-likelihood of that attention (``matching_loss``)::

    python matching_network.py /path/to/data --num-shots 1 --num-ways 5 --batch-size 16 \\
        --num-batches 100 --download --use-cuda --output-folder results

With metalearn (torchmeta does not install beside a current torch) the same program runs with only
its import lines changed, ``torchmeta`` -> ``metalearn.torchmeta``::

    from metalearn.torchmeta.datasets.helpers import omniglot
    from metalearn.torchmeta.utils.data import BatchMetaDataLoader
    from metalearn.torchmeta.utils.matching import matching_log_probas, matching_loss

and, offline, on metalearn's procedural glyphs (Omniglot-like characters, nothing to download;
``folder`` is then unused) by importing the ``glyphs`` helper under the name ``omniglot``::

    from metalearn.torchmeta.datasets.helpers import glyphs as omniglot

``tests/test_torchmeta_examples.py`` runs it both ways. At the end the network is evaluated on
tasks of the meta-test classes (``meta_test=True``) and the program prints ``test accuracy: 0.xxxx``.
"""

import argparse
import os

import torch
import torch.nn as nn
from tqdm import tqdm

from torchmeta.datasets.helpers import omniglot
from torchmeta.utils.data import BatchMetaDataLoader
from torchmeta.utils.matching import matching_log_probas, matching_loss


def conv3x3(in_channels, out_channels, **kwargs):
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1, **kwargs),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(),
        nn.MaxPool2d(2),
    )


class MatchingNetwork(nn.Module):
    """A matching network without full-context embeddings: every image of a batch of tasks
    (``[batch_size, num_examples, C, H, W]``) is embedded by the same 4 convolutional blocks
    (``[batch_size, num_examples, D]``); the attention over the support set is computed from these
    embeddings by ``matching_log_probas``."""

    def __init__(self, in_channels, out_channels, hidden_size=64):
        super(MatchingNetwork, self).__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.hidden_size = hidden_size

        self.embedding = nn.Sequential(
            conv3x3(in_channels, hidden_size),
            conv3x3(hidden_size, hidden_size),
            conv3x3(hidden_size, hidden_size),
            conv3x3(hidden_size, out_channels),
        )

    def forward(self, inputs):
        embeddings = self.embedding(inputs.view(-1, *inputs.shape[2:]))
        return embeddings.view(*inputs.shape[:2], -1)


def get_accuracy(log_probas, targets):
    """The fraction of ``targets`` ([batch_size, num_examples]) that are the most probable class of
    the matching network's ``log_probas`` ([batch_size, num_classes, num_examples])."""
    _, predictions = torch.max(log_probas, dim=1)
    return torch.mean(predictions.eq(targets).float())


def train(args):
    dataset = omniglot(args.folder, shots=args.num_shots, ways=args.num_ways, shuffle=True,
                       test_shots=args.test_shots, meta_train=True, download=args.download)
    dataloader = BatchMetaDataLoader(dataset, batch_size=args.batch_size, shuffle=True,
                                     num_workers=args.num_workers)

    model = MatchingNetwork(1, args.embedding_size, hidden_size=args.hidden_size)
    model.to(device=args.device)
    model.train()
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)

    # Training loop
    with tqdm(dataloader, total=args.num_batches, disable=args.quiet) as pbar:
        for batch_idx, batch in enumerate(pbar):
            model.zero_grad()

            train_inputs, train_targets = batch['train']
            train_inputs = train_inputs.to(device=args.device)
            train_targets = train_targets.to(device=args.device)
            train_embeddings = model(train_inputs)

            test_inputs, test_targets = batch['test']
            test_inputs = test_inputs.to(device=args.device)
            test_targets = test_targets.to(device=args.device)
            test_embeddings = model(test_inputs)

            loss = matching_loss(train_embeddings, train_targets, test_embeddings, test_targets,
                                 dataset.num_classes_per_task)

            loss.backward()
            optimizer.step()

            with torch.no_grad():
                log_probas = matching_log_probas(train_embeddings, train_targets, test_embeddings,
                                                 dataset.num_classes_per_task)
                accuracy = get_accuracy(log_probas, test_targets)
                pbar.set_postfix(accuracy='{0:.4f}'.format(accuracy.item()))

            if batch_idx + 1 >= args.num_batches:
                break
    print('train accuracy (last batch): {0:.4f}'.format(accuracy.item()))

    # Save model
    if args.output_folder is not None:
        os.makedirs(args.output_folder, exist_ok=True)
        filename = os.path.join(args.output_folder, 'matching_network_omniglot_'
                                '{0}shot_{1}way.pt'.format(args.num_shots, args.num_ways))
        with open(filename, 'wb') as f:
            state_dict = model.state_dict()
            torch.save(state_dict, f)

    return model


def evaluate(model, args):
    """Mean query accuracy on ``--num-test-batches`` batches of meta-test tasks (the network in
    eval mode: BatchNorm with the statistics gathered in training)."""
    dataset = omniglot(args.folder, shots=args.num_shots, ways=args.num_ways, shuffle=True,
                       test_shots=args.test_shots, meta_test=True, download=args.download)
    dataloader = BatchMetaDataLoader(dataset, batch_size=args.batch_size, shuffle=True,
                                     num_workers=args.num_workers)
    model.eval()
    accuracies = []
    with torch.no_grad():
        for batch_idx, batch in enumerate(dataloader):
            train_inputs, train_targets = batch['train']
            test_inputs, test_targets = batch['test']
            train_embeddings = model(train_inputs.to(device=args.device))
            test_embeddings = model(test_inputs.to(device=args.device))
            log_probas = matching_log_probas(train_embeddings, train_targets.to(device=args.device),
                                             test_embeddings, dataset.num_classes_per_task)
            accuracies.append(get_accuracy(log_probas, test_targets.to(device=args.device)).item())
            if batch_idx + 1 >= args.num_test_batches:
                break
    return sum(accuracies) / len(accuracies)


if __name__ == '__main__':
    parser = argparse.ArgumentParser('Matching Networks')

    parser.add_argument('folder', type=str,
        help='Path to the folder the data is downloaded to.')
    parser.add_argument('--num-shots', type=int, default=5,
        help='Number of examples per class (k in "k-shot", default: 5).')
    parser.add_argument('--num-ways', type=int, default=5,
        help='Number of classes per task (N in "N-way", default: 5).')
    parser.add_argument('--test-shots', type=int, default=15,
        help='Number of query examples per class (default: 15).')

    parser.add_argument('--embedding-size', type=int, default=64,
        help='Number of channels of the last convolutional layer, the embedding (default: 64).')
    parser.add_argument('--hidden-size', type=int, default=64,
        help='Number of channels for each convolutional layer (default: 64).')
    parser.add_argument('--lr', type=float, default=1e-3,
        help='Learning rate of the optimizer, Adam (default: 1e-3).')

    parser.add_argument('--output-folder', type=str, default=None,
        help='Path to the output folder for saving the model (optional).')
    parser.add_argument('--batch-size', type=int, default=16,
        help='Number of tasks in a mini-batch of tasks (default: 16).')
    parser.add_argument('--num-batches', type=int, default=100,
        help='Number of batches the matching network is trained over (default: 100).')
    parser.add_argument('--num-test-batches', type=int, default=10,
        help='Number of batches of meta-test tasks to evaluate on (default: 10).')
    parser.add_argument('--num-workers', type=int, default=1,
        help='Number of workers for data loading (default: 1).')
    parser.add_argument('--download', action='store_true',
        help='Download the Omniglot dataset in the data folder.')
    parser.add_argument('--use-cuda', action='store_true',
        help='Use CUDA if available.')
    parser.add_argument('--seed', type=int, default=None,
        help='Seed of torch\'s generators (which tasks are drawn, the initialisation).')
    parser.add_argument('--quiet', action='store_true',
        help='No progress bar.')

    args = parser.parse_args()
    args.device = torch.device('cuda' if args.use_cuda
        and torch.cuda.is_available() else 'cpu')
    if args.seed is not None:
        torch.manual_seed(args.seed)

    model = train(args)
    test_accuracy = evaluate(model, args)
    print('test accuracy: {0:.4f}'.format(test_accuracy))
