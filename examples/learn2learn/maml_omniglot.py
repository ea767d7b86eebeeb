#!/usr/bin/env python3

"""MAML (Finn et al. 2017) on Omniglot, written against learn2learn's API.

Shows how to:

* load Omniglot through the benchmark interface, ``l2l.vision.benchmarks.get_tasksets``: every task
  has ``ways`` characters (each turned by a random multiple of 90 degrees) of ``2 * shots`` drawings;
* split each task into adaptation (support) and evaluation (query) halves with
  ``l2l.data.utils.partition_task``;
* meta-learn with the ``l2l.algorithms.MAML`` wrapper: ``learner = maml.clone()``, then
  ``learner.adapt(loss)`` for each adaptation step, second order unless ``--first-order``.

Usage::

    python maml_omniglot.py                                  # 5-way 1-shot, OmniglotFC, 60000 meta-steps
    python maml_omniglot.py --model cnn --shots 5            # the CNN of the MAML paper, 5-shot
    python maml_omniglot.py --num-iterations 100 --meta-batch-size 8 --no-cuda   # a short run

Every parameter is a keyword argument of ``main(...)`` and a command-line option. The defaults are the
usual ones of learn2learn's MAML-on-Omniglot example (5-way 1-shot, meta_lr 0.003, fast_lr 0.5,
meta-batch 32, one adaptation step, 20000 tasks per split).

Running it with metalearn instead of learn2learn (whose Cython extension no longer builds on Python 3.11+):
change the import line, nothing else::

    import learn2learn as l2l   ->   import metalearn.learn2learn as l2l

``--dataset`` and ``--root`` pick the benchmark and its data root. ``--config`` is passed to
``get_tasksets`` as ``config=`` (a metalearn option, left out of the call unless given; learn2learn
would ignore it): with metalearn, ``--root DIR --config omniglot_small`` runs on the two small real
subsets of Omniglot in ``DIR/omniglot/``, ``--dataset glyphs`` on metalearn's procedural glyphs
(offline, nothing to download).

Prints the meta-train and meta-validation error and accuracy every ``--log-every`` iterations, then
``Meta Test Error`` and ``Meta Test Accuracy`` over ``--test-tasks`` tasks of the test split (default:
one meta-batch).
"""

import argparse
import json
import random

import numpy as np
import torch
from torch import nn, optim

import learn2learn as l2l


def accuracy(predictions, targets):
    predictions = predictions.argmax(dim=1).view(targets.shape)
    return (predictions == targets).sum().float() / targets.size(0)


def fast_adapt(batch, learner, loss, adaptation_steps, shots, device):
    """Adapt ``learner`` on the first ``shots`` samples of each class, evaluate it on the others."""
    data, labels = batch
    data, labels = data.to(device), labels.to(device)
    (adaptation_data, adaptation_labels), (evaluation_data, evaluation_labels) = \
        l2l.data.utils.partition_task(data, labels, shots=shots)

    # Adapt the model
    for step in range(adaptation_steps):
        adaptation_error = loss(learner(adaptation_data), adaptation_labels)
        learner.adapt(adaptation_error)

    # Evaluate the adapted model
    predictions = learner(evaluation_data)
    evaluation_error = loss(predictions, evaluation_labels)
    evaluation_accuracy = accuracy(predictions, evaluation_labels)
    return evaluation_error, evaluation_accuracy


def main(
        ways=5,
        shots=1,
        meta_lr=0.003,
        fast_lr=0.5,
        meta_batch_size=32,
        adaptation_steps=1,
        num_iterations=60000,
        first_order=False,
        model_name='fc',
        dataset='omniglot',
        root='~/data',
        config=None,
        num_tasks=20000,
        test_tasks=None,
        log_every=1,
        cuda=True,
        seed=42,
):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    device = torch.device('cpu')
    if cuda and torch.cuda.device_count():
        torch.cuda.manual_seed(seed)
        device = torch.device('cuda')

    # Load the train/validation/test tasksets
    options = {} if config is None else {'config': config}
    tasksets = l2l.vision.benchmarks.get_tasksets(dataset,
                                                  train_ways=ways,
                                                  train_samples=2 * shots,
                                                  test_ways=ways,
                                                  test_samples=2 * shots,
                                                  num_tasks=num_tasks,
                                                  root=root,
                                                  **options)

    # Create the model and its MAML wrapper
    if model_name == 'fc':
        model = l2l.vision.models.OmniglotFC(28 ** 2, ways)
    elif model_name == 'cnn':
        model = l2l.vision.models.OmniglotCNN(ways)
    else:
        raise ValueError(f"model_name must be 'fc' or 'cnn', got {model_name!r}")
    model.to(device)
    maml = l2l.algorithms.MAML(model, lr=fast_lr, first_order=first_order)
    opt = optim.Adam(maml.parameters(), meta_lr)
    loss = nn.CrossEntropyLoss(reduction='mean')

    for iteration in range(num_iterations):
        opt.zero_grad()
        meta_train_error = 0.0
        meta_train_accuracy = 0.0
        meta_valid_error = 0.0
        meta_valid_accuracy = 0.0
        log = (iteration + 1) % log_every == 0 or iteration + 1 == num_iterations
        for task in range(meta_batch_size):
            # Compute the meta-training loss
            learner = maml.clone()
            batch = tasksets.train.sample()
            evaluation_error, evaluation_accuracy = fast_adapt(batch,
                                                               learner,
                                                               loss,
                                                               adaptation_steps,
                                                               shots,
                                                               device)
            evaluation_error.backward()
            meta_train_error += evaluation_error.item()
            meta_train_accuracy += evaluation_accuracy.item()

            if log:
                # Compute the meta-validation loss
                learner = maml.clone()
                batch = tasksets.validation.sample()
                evaluation_error, evaluation_accuracy = fast_adapt(batch,
                                                                   learner,
                                                                   loss,
                                                                   adaptation_steps,
                                                                   shots,
                                                                   device)
                meta_valid_error += evaluation_error.item()
                meta_valid_accuracy += evaluation_accuracy.item()

        if log:
            print('\n')
            print('Iteration', iteration)
            print('Meta Train Error', meta_train_error / meta_batch_size)
            print('Meta Train Accuracy', meta_train_accuracy / meta_batch_size)
            print('Meta Valid Error', meta_valid_error / meta_batch_size)
            print('Meta Valid Accuracy', meta_valid_accuracy / meta_batch_size)

        # Average the accumulated gradients and optimize
        for p in maml.parameters():
            if p.grad is not None:
                p.grad.data.mul_(1.0 / meta_batch_size)
        opt.step()

    # Meta-test: adapt to unseen characters
    test_tasks = meta_batch_size if test_tasks is None else test_tasks
    meta_test_error = 0.0
    meta_test_accuracy = 0.0
    for task in range(test_tasks):
        learner = maml.clone()
        batch = tasksets.test.sample()
        evaluation_error, evaluation_accuracy = fast_adapt(batch,
                                                           learner,
                                                           loss,
                                                           adaptation_steps,
                                                           shots,
                                                           device)
        meta_test_error += evaluation_error.item()
        meta_test_accuracy += evaluation_accuracy.item()
    print('Meta Test Error', meta_test_error / test_tasks)
    print('Meta Test Accuracy', meta_test_accuracy / test_tasks)
    return meta_test_accuracy / test_tasks


def config_option(text):
    """``--config``: a JSON object (a dict of options) or a name, as it is."""
    return json.loads(text) if text.lstrip().startswith('{') else text


if __name__ == '__main__':
    parser = argparse.ArgumentParser(description='MAML on Omniglot (learn2learn API).')
    parser.add_argument('--ways', type=int, default=5)
    parser.add_argument('--shots', type=int, default=1)
    parser.add_argument('--meta-lr', type=float, default=0.003)
    parser.add_argument('--fast-lr', type=float, default=0.5)
    parser.add_argument('--meta-batch-size', type=int, default=32)
    parser.add_argument('--adaptation-steps', type=int, default=1)
    parser.add_argument('--num-iterations', type=int, default=60000)
    parser.add_argument('--first-order', action='store_true', help='FOMAML: no second derivatives')
    parser.add_argument('--model', dest='model_name', choices=['fc', 'cnn'], default='fc')
    parser.add_argument('--dataset', default='omniglot', help='the get_tasksets benchmark name')
    parser.add_argument('--root', default='~/data', help='the data root')
    parser.add_argument('--config', type=config_option, default=None,
                        help='passed to get_tasksets as config= when given (metalearn: a data preset '
                             'name or a JSON object of dataset options)')
    parser.add_argument('--num-tasks', type=int, default=20000, help='tasks per split (-1: a new task every time)')
    parser.add_argument('--test-tasks', type=int, default=None, help='meta-test tasks (default: --meta-batch-size)')
    parser.add_argument('--log-every', type=int, default=1, help='iterations between printed (and validated) ones')
    parser.add_argument('--no-cuda', dest='cuda', action='store_false')
    parser.add_argument('--seed', type=int, default=42)
    main(**vars(parser.parse_args()))
