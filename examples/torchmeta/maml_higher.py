"""MAML (Finn et al. 2017) on Omniglot with ``higher``, written against torchmeta's API.

Torchmeta serves the data (``torchmeta.datasets.helpers.omniglot``, ``BatchMetaDataLoader``) and
``higher`` (``pip install higher``) does the inner loop: the model is a plain ``nn.Module``
(``nn.Conv2d``, ``nn.BatchNorm2d``, ``nn.Linear``), which ``higher.innerloop_ctx`` turns into a
functional model adapted by a differentiable optimizer, so any torch optimizer (here SGD) can be
the inner one and the outer loss differentiates through its steps. The program is written for
torchmeta (``pip install torchmeta``, torch<1.10)::

    python maml_higher.py /path/to/data --num-shots 1 --num-ways 5 --step-size 0.4 \\
        --batch-size 16 --num-batches 600 --download --use-cuda --output-folder results

With metalearn (torchmeta does not install beside a current torch) the same program runs with only
its import lines changed, ``torchmeta`` -> ``metalearn.torchmeta``::

    from metalearn.torchmeta.datasets.helpers import omniglot
    from metalearn.torchmeta.utils.data import BatchMetaDataLoader

and, offline, on metalearn's procedural glyphs (Omniglot-like characters, nothing to download;
``folder`` is then unused) by importing the ``glyphs`` helper under the name ``omniglot``::

    from metalearn.torchmeta.datasets.helpers import glyphs as omniglot

``higher`` itself is unchanged. ``tests/test_torchmeta_examples.py`` runs the program both ways.
At the end the model is evaluated on tasks of the meta-test classes (``meta_test=True``), adapting
as in training, and the program prints ``test accuracy: 0.xxxx``.
"""

import argparse
import os

import higher
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from torchmeta.datasets.helpers import omniglot
from torchmeta.utils.data import BatchMetaDataLoader


def conv3x3(in_channels, out_channels, **kwargs):
    # Batch statistics always (track_running_stats=False), as in the MAML paper.
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1, **kwargs),
        nn.BatchNorm2d(out_channels, momentum=1.0, track_running_stats=False),
        nn.ReLU(),
        nn.MaxPool2d(2),
    )


class ConvolutionalNeuralNetwork(nn.Module):
    """The 4-block convolutional network of the MAML paper, as a plain ``nn.Module``."""

    def __init__(self, in_channels, out_features, hidden_size=64):
        super(ConvolutionalNeuralNetwork, self).__init__()
        self.in_channels = in_channels
        self.out_features = out_features
        self.hidden_size = hidden_size

        self.features = nn.Sequential(
            conv3x3(in_channels, hidden_size),
            conv3x3(hidden_size, hidden_size),
            conv3x3(hidden_size, hidden_size),
            conv3x3(hidden_size, hidden_size),
        )
        self.classifier = nn.Linear(hidden_size, out_features)

    def forward(self, inputs):
        features = self.features(inputs)
        features = features.view((features.size(0), -1))
        return self.classifier(features)


def get_accuracy(logits, targets):
    """The fraction of ``targets`` predicted by the argmax of ``logits``."""
    _, predictions = torch.max(logits, dim=-1)
    return torch.mean(predictions.eq(targets).float())


def adapt_and_evaluate(model, inner_optimizer, batch, args, first_order, backward=True):
    """Adapt ``model`` to each task of ``batch`` with ``--num-steps`` steps of ``inner_optimizer``
    on its support set and return the mean query loss and accuracy. With ``backward``, each task's
    query loss is backpropagated to the initialisation as soon as it is computed (so one task's
    graph is held at a time): through the inner steps (second order), or, ``first_order``, as the
    gradient at the adapted parameters (first-order MAML)."""
    train_inputs, train_targets = batch['train']
    train_inputs = train_inputs.to(device=args.device)
    train_targets = train_targets.to(device=args.device)

    test_inputs, test_targets = batch['test']
    test_inputs = test_inputs.to(device=args.device)
    test_targets = test_targets.to(device=args.device)

    num_tasks = train_inputs.size(0)
    outer_loss = 0.
    accuracy = 0.
    for task_idx, (train_input, train_target, test_input,
                   test_target) in enumerate(zip(train_inputs, train_targets, test_inputs, test_targets)):
        with higher.innerloop_ctx(model, inner_optimizer, copy_initial_weights=False,
                                  track_higher_grads=not first_order) as (fmodel, diffopt):
            for _ in range(args.num_steps):
                train_logit = fmodel(train_input)
                inner_loss = F.cross_entropy(train_logit, train_target)
                diffopt.step(inner_loss)

            test_logit = fmodel(test_input)
            test_loss = F.cross_entropy(test_logit, test_target) / num_tasks
            if backward:
                if first_order:
                    # The adapted parameters are new leaves: their gradient is the first-order meta-gradient.
                    grads = torch.autograd.grad(test_loss, list(fmodel.parameters()))
                    for param, grad in zip(model.parameters(), grads):
                        param.grad = grad if param.grad is None else param.grad + grad
                else:
                    test_loss.backward()

            outer_loss += test_loss.item()
            accuracy += get_accuracy(test_logit.detach(), test_target).item() / num_tasks

    return outer_loss, accuracy


def train(args):
    dataset = omniglot(args.folder, shots=args.num_shots, ways=args.num_ways, shuffle=True,
                       test_shots=args.test_shots, meta_train=True, download=args.download)
    dataloader = BatchMetaDataLoader(dataset, batch_size=args.batch_size, shuffle=True,
                                     num_workers=args.num_workers)

    model = ConvolutionalNeuralNetwork(1, args.num_ways, hidden_size=args.hidden_size)
    model.to(device=args.device)
    model.train()
    inner_optimizer = torch.optim.SGD(model.parameters(), lr=args.step_size)
    meta_optimizer = torch.optim.Adam(model.parameters(), lr=args.meta_lr)

    # Training loop
    with tqdm(dataloader, total=args.num_batches, disable=args.quiet) as pbar:
        for batch_idx, batch in enumerate(pbar):
            meta_optimizer.zero_grad()
            outer_loss, accuracy = adapt_and_evaluate(model, inner_optimizer, batch, args,
                                                      first_order=args.first_order)
            meta_optimizer.step()

            pbar.set_postfix(accuracy='{0:.4f}'.format(accuracy))
            if batch_idx + 1 >= args.num_batches:
                break
    print('train accuracy (last batch): {0:.4f}'.format(accuracy))

    # Save model
    if args.output_folder is not None:
        os.makedirs(args.output_folder, exist_ok=True)
        filename = os.path.join(args.output_folder, 'maml_higher_omniglot_'
                                '{0}shot_{1}way.th'.format(args.num_shots, args.num_ways))
        with open(filename, 'wb') as f:
            state_dict = model.state_dict()
            torch.save(state_dict, f)

    return model, inner_optimizer


def evaluate(model, inner_optimizer, args):
    """Mean query accuracy on ``--num-test-batches`` batches of meta-test tasks, after adapting to
    each support set as in training (nothing is backpropagated)."""
    dataset = omniglot(args.folder, shots=args.num_shots, ways=args.num_ways, shuffle=True,
                       test_shots=args.test_shots, meta_test=True, download=args.download)
    dataloader = BatchMetaDataLoader(dataset, batch_size=args.batch_size, shuffle=True,
                                     num_workers=args.num_workers)
    accuracies = []
    for batch_idx, batch in enumerate(dataloader):
        _, accuracy = adapt_and_evaluate(model, inner_optimizer, batch, args, first_order=True, backward=False)
        accuracies.append(accuracy)
        if batch_idx + 1 >= args.num_test_batches:
            break
    return sum(accuracies) / len(accuracies)


if __name__ == '__main__':
    parser = argparse.ArgumentParser('Model-Agnostic Meta-Learning (MAML) with higher')

    parser.add_argument('folder', type=str,
        help='Path to the folder the data is downloaded to.')
    parser.add_argument('--num-shots', type=int, default=5,
        help='Number of examples per class (k in "k-shot", default: 5).')
    parser.add_argument('--num-ways', type=int, default=5,
        help='Number of classes per task (N in "N-way", default: 5).')
    parser.add_argument('--test-shots', type=int, default=15,
        help='Number of query examples per class (default: 15).')

    parser.add_argument('--first-order', action='store_true',
        help='Use the first-order approximation of MAML.')
    parser.add_argument('--step-size', type=float, default=0.4,
        help='Learning rate of the inner SGD optimizer (default: 0.4).')
    parser.add_argument('--num-steps', type=int, default=1,
        help='Number of inner SGD steps (default: 1).')
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

    model, inner_optimizer = train(args)
    test_accuracy = evaluate(model, inner_optimizer, args)
    print('test accuracy: {0:.4f}'.format(test_accuracy))
