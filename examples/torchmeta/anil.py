"""ANIL (Almost No Inner Loop, Raghu et al. 2020) on Omniglot, written against torchmeta's API.

ANIL is MAML with the inner loop cut down to the network's head: the features of a task's images
are computed once by the convolutional body (meta-learned in the outer loop only) and only the
classifier, a ``torchmeta.modules.MetaLinear``, is adapted to the support set, with
``torchmeta.utils.gradient_based.gradient_update_parameters`` on its own parameters. The program is
written for torchmeta (``pip install torchmeta``, torch<1.10)::

    python anil.py /path/to/data --num-shots 1 --num-ways 5 --step-size 0.4 --num-steps 5 \\
        --batch-size 16 --num-batches 600 --download --use-cuda --output-folder results

With metalearn (torchmeta does not install beside a current torch) the same program runs with only
its import lines changed, ``torchmeta`` -> ``metalearn.torchmeta``::

    from metalearn.torchmeta.datasets.helpers import omniglot
    from metalearn.torchmeta.modules import (MetaModule, MetaSequential, MetaConv2d, MetaBatchNorm2d, MetaLinear)
    ...

and, offline, on metalearn's procedural glyphs (Omniglot-like characters, nothing to download;
``folder`` is then unused) by importing the ``glyphs`` helper under the name ``omniglot``::

    from metalearn.torchmeta.datasets.helpers import glyphs as omniglot

``tests/test_torchmeta_examples.py`` runs it both ways. At the end the model is evaluated on tasks
of the meta-test classes (``meta_test=True``), adapting its head as in training, and the program
prints ``test accuracy: 0.xxxx``.
"""

import argparse
import os
from collections import OrderedDict

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from torchmeta.datasets.helpers import omniglot
from torchmeta.modules import MetaBatchNorm2d, MetaConv2d, MetaLinear, MetaModule, MetaSequential
from torchmeta.utils.data import BatchMetaDataLoader
from torchmeta.utils.gradient_based import gradient_update_parameters


def conv3x3(in_channels, out_channels, **kwargs):
    # Batch statistics always (track_running_stats=False), as in the MAML paper: a task's support
    # and query sets are normalised by their own statistics, in training and at test time alike.
    return MetaSequential(
        MetaConv2d(in_channels, out_channels, kernel_size=3, padding=1, **kwargs),
        MetaBatchNorm2d(out_channels, momentum=1.0, track_running_stats=False),
        nn.ReLU(),
        nn.MaxPool2d(2),
    )


class ConvolutionalNeuralNetwork(MetaModule):
    """The 4-block convolutional network of the MAML paper (28x28 inputs -> ``hidden_size`` features)."""

    def __init__(self, in_channels, out_features, hidden_size=64):
        super(ConvolutionalNeuralNetwork, self).__init__()
        self.in_channels = in_channels
        self.out_features = out_features
        self.hidden_size = hidden_size

        self.features = MetaSequential(
            conv3x3(in_channels, hidden_size),
            conv3x3(hidden_size, hidden_size),
            conv3x3(hidden_size, hidden_size),
            conv3x3(hidden_size, hidden_size),
        )
        self.classifier = MetaLinear(hidden_size, out_features)

    def embed(self, inputs, params=None):
        features = self.features(inputs, params=self.get_subdict(params, 'features'))
        return features.view((features.size(0), -1))

    def forward(self, inputs, params=None):
        features = self.embed(inputs, params=params)
        logits = self.classifier(features, params=self.get_subdict(params, 'classifier'))
        return logits


def get_accuracy(logits, targets):
    """The fraction of ``targets`` predicted by the argmax of ``logits``."""
    _, predictions = torch.max(logits, dim=-1)
    return torch.mean(predictions.eq(targets).float())


def adapt_and_evaluate(model, batch, args, first_order):
    """Adapt the head of ``model`` to each task of ``batch`` (``--num-steps`` gradient steps on its
    support set, the body's features fixed) and return the mean query loss (differentiable w.r.t.
    the body and the head's initialisation) and accuracy."""
    train_inputs, train_targets = batch['train']
    train_inputs = train_inputs.to(device=args.device)
    train_targets = train_targets.to(device=args.device)

    test_inputs, test_targets = batch['test']
    test_inputs = test_inputs.to(device=args.device)
    test_targets = test_targets.to(device=args.device)

    outer_loss = torch.tensor(0., device=args.device)
    accuracy = torch.tensor(0., device=args.device)
    for task_idx, (train_input, train_target, test_input,
                   test_target) in enumerate(zip(train_inputs, train_targets, test_inputs, test_targets)):
        # The body runs once per task: the inner loop only sees its features.
        train_features = model.embed(train_input)
        test_features = model.embed(test_input)

        params = OrderedDict(model.classifier.meta_named_parameters())
        for _ in range(args.num_steps):
            train_logit = model.classifier(train_features, params=params)
            inner_loss = F.cross_entropy(train_logit, train_target)
            params = gradient_update_parameters(model.classifier, inner_loss, params=params,
                                                step_size=args.step_size, first_order=first_order)

        test_logit = model.classifier(test_features, params=params)
        outer_loss += F.cross_entropy(test_logit, test_target)

        with torch.no_grad():
            accuracy += get_accuracy(test_logit, test_target)

    num_tasks = train_inputs.size(0)
    return outer_loss.div_(num_tasks), accuracy.div_(num_tasks)


def train(args):
    dataset = omniglot(args.folder, shots=args.num_shots, ways=args.num_ways, shuffle=True,
                       test_shots=args.test_shots, meta_train=True, download=args.download)
    dataloader = BatchMetaDataLoader(dataset, batch_size=args.batch_size, shuffle=True,
                                     num_workers=args.num_workers)

    model = ConvolutionalNeuralNetwork(1, args.num_ways, hidden_size=args.hidden_size)
    model.to(device=args.device)
    model.train()
    meta_optimizer = torch.optim.Adam(model.parameters(), lr=args.meta_lr)

    # Training loop
    with tqdm(dataloader, total=args.num_batches, disable=args.quiet) as pbar:
        for batch_idx, batch in enumerate(pbar):
            model.zero_grad()
            outer_loss, accuracy = adapt_and_evaluate(model, batch, args, first_order=args.first_order)
            outer_loss.backward()
            meta_optimizer.step()

            pbar.set_postfix(accuracy='{0:.4f}'.format(accuracy.item()))
            if batch_idx + 1 >= args.num_batches:
                break
    print('train accuracy (last batch): {0:.4f}'.format(accuracy.item()))

    # Save model
    if args.output_folder is not None:
        os.makedirs(args.output_folder, exist_ok=True)
        filename = os.path.join(args.output_folder, 'anil_omniglot_'
                                '{0}shot_{1}way.th'.format(args.num_shots, args.num_ways))
        with open(filename, 'wb') as f:
            state_dict = model.state_dict()
            torch.save(state_dict, f)

    return model


def evaluate(model, args):
    """Mean query accuracy on ``--num-test-batches`` batches of meta-test tasks, after the head's
    adaptation to each support set (first-order: nothing is differentiated through it)."""
    dataset = omniglot(args.folder, shots=args.num_shots, ways=args.num_ways, shuffle=True,
                       test_shots=args.test_shots, meta_test=True, download=args.download)
    dataloader = BatchMetaDataLoader(dataset, batch_size=args.batch_size, shuffle=True,
                                     num_workers=args.num_workers)
    accuracies = []
    for batch_idx, batch in enumerate(dataloader):
        _, accuracy = adapt_and_evaluate(model, batch, args, first_order=True)
        accuracies.append(accuracy.item())
        if batch_idx + 1 >= args.num_test_batches:
            break
    return sum(accuracies) / len(accuracies)


if __name__ == '__main__':
    parser = argparse.ArgumentParser('Almost No Inner Loop (ANIL)')

    parser.add_argument('folder', type=str,
        help='Path to the folder the data is downloaded to.')
    parser.add_argument('--num-shots', type=int, default=5,
        help='Number of examples per class (k in "k-shot", default: 5).')
    parser.add_argument('--num-ways', type=int, default=5,
        help='Number of classes per task (N in "N-way", default: 5).')
    parser.add_argument('--test-shots', type=int, default=15,
        help='Number of query examples per class (default: 15).')

    parser.add_argument('--first-order', action='store_true',
        help='Do not differentiate through the head\'s adaptation (first-order approximation).')
    parser.add_argument('--step-size', type=float, default=0.4,
        help='Step-size for the gradient steps of the head\'s adaptation (default: 0.4).')
    parser.add_argument('--num-steps', type=int, default=1,
        help='Number of gradient steps of the head\'s adaptation (default: 1).')
    parser.add_argument('--meta-lr', type=float, default=1e-3,
        help='Learning rate of the meta-optimizer, Adam (default: 1e-3).')
    parser.add_argument('--hidden-size', type=int, default=64,
        help='Number of channels for each convolutional layer (default: 64).')

    parser.add_argument('--output-folder', type=str, default=None,
        help='Path to the output folder for saving the model (optional).')
    parser.add_argument('--batch-size', type=int, default=16,
        help='Number of tasks in a mini-batch of tasks (default: 16).')
    parser.add_argument('--num-batches', type=int, default=100,
        help='Number of batches the model is trained over (default: 100).')
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
