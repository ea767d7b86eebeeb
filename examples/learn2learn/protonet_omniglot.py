#!/usr/bin/env python3

"""Prototypical Networks (Snell et al. 2017) on Omniglot, written against learn2learn's API.

Shows how to:

* load Omniglot through the benchmark interface, ``l2l.vision.benchmarks.get_tasksets``, with more
  classes in the training tasks (``--train-ways``) than in the test tasks (``--test-ways``), as Snell
  et al. train;
* embed a task with the features of ``l2l.vision.models.OmniglotCNN`` and split the embeddings into
  support and query with ``l2l.data.utils.partition_task``;
* classify the queries by their distance to the class means with ``l2l.nn.PrototypicalClassifier``.

Usage::

    python protonet_omniglot.py                           # 60-way training, 5-way 1-shot testing
    python protonet_omniglot.py --shots 5 --train-ways 20
    python protonet_omniglot.py --max-epoch 2 --episodes-per-epoch 50 --no-cuda   # a short run

Every parameter is a keyword argument of ``main(...)`` and a command-line option.

Running it with metalearn instead of learn2learn (whose Cython extension no longer builds on Python 3.11+):
change the import line, nothing else::

    import learn2learn as l2l   ->   import metalearn.learn2learn as l2l

``--dataset`` and ``--root`` pick the benchmark and its data root. ``--config`` is passed to
``get_tasksets`` as ``config=`` (a metalearn option, left out of the call unless given; learn2learn
would ignore it): with metalearn, ``--root DIR --config omniglot_small`` runs on the two small real
subsets of Omniglot in ``DIR/omniglot/``, ``--dataset glyphs`` on metalearn's procedural glyphs
(offline, nothing to download).

Prints the training and validation loss and accuracy after every epoch, then ``Meta Test Accuracy``
over ``--test-episodes`` test tasks (with its 95% confidence interval).
"""

import argparse
import json
import random

import numpy as np
import torch
from torch.nn import functional as F

import learn2learn as l2l


def accuracy(predictions, targets):
    predictions = predictions.argmax(dim=1).view(targets.shape)
    return (predictions == targets).sum().float() / targets.size(0)


def fast_adapt(model, batch, shots, metric, device):
    """The prototypical loss and accuracy of one task: the first ``shots`` samples of each class are the
    support set, the others the queries."""
    data, labels = batch
    data, labels = data.to(device), labels.to(device)
    embeddings = model(data)
    (support, support_labels), (query, query_labels) = \
        l2l.data.utils.partition_task(embeddings, labels, shots=shots)
    classifier = l2l.nn.PrototypicalClassifier(support, support_labels, distance=metric)
    logits = classifier(query)
    loss = F.cross_entropy(logits, query_labels)
    return loss, accuracy(logits, query_labels)


def main(
        train_ways=60,
        train_query=5,
        test_ways=5,
        test_query=5,
        shots=1,
        max_epoch=250,
        episodes_per_epoch=100,
        val_episodes=100,
        test_episodes=1000,
        lr=0.001,
        lr_step=20,
        metric='euclidean',
        hidden_size=64,
        dataset='omniglot',
        root='~/data',
        config=None,
        num_tasks=-1,
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
                                                  train_ways=train_ways,
                                                  train_samples=shots + train_query,
                                                  test_ways=test_ways,
                                                  test_samples=shots + test_query,
                                                  num_tasks=num_tasks,
                                                  root=root,
                                                  **options)

    # The embedding network: the convolutional features of the Omniglot CNN (its linear head is not used)
    model = l2l.vision.models.OmniglotCNN(output_size=train_ways, hidden_size=hidden_size).features
    model.to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    lr_scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=lr_step, gamma=0.5)

    for epoch in range(1, max_epoch + 1):
        model.train()
        loss_ctr = 0
        n_loss = 0
        n_acc = 0
        for i in range(episodes_per_epoch):
            batch = tasksets.train.sample()
            loss, acc = fast_adapt(model, batch, shots, metric, device)
            loss_ctr += 1
            n_loss += loss.item()
            n_acc += acc.item()

            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        lr_scheduler.step()
        print('epoch {}, train, loss={:.4f} acc={:.4f}'.format(epoch, n_loss / loss_ctr, n_acc / loss_ctr))

        model.eval()
        loss_ctr = 0
        n_loss = 0
        n_acc = 0
        with torch.no_grad():
            for i in range(val_episodes):
                batch = tasksets.validation.sample()
                loss, acc = fast_adapt(model, batch, shots, metric, device)
                loss_ctr += 1
                n_loss += loss.item()
                n_acc += acc.item()
        print('epoch {}, val, loss={:.4f} acc={:.4f}'.format(epoch, n_loss / max(loss_ctr, 1), n_acc / max(loss_ctr, 1)))

    # Meta-test on unseen characters
    model.eval()
    accuracies = []
    with torch.no_grad():
        for i in range(test_episodes):
            batch = tasksets.test.sample()
            loss, acc = fast_adapt(model, batch, shots, metric, device)
            accuracies.append(acc.item())
    mean = float(np.mean(accuracies))
    interval = 1.96 * float(np.std(accuracies)) / np.sqrt(len(accuracies))
    print('Meta Test Accuracy', mean)
    print('Meta Test 95% Interval', interval)
    return mean


def config_option(text):
    """``--config``: a JSON object (a dict of options) or a name, as it is."""
    return json.loads(text) if text.lstrip().startswith('{') else text


if __name__ == '__main__':
    parser = argparse.ArgumentParser(description='Prototypical Networks on Omniglot (learn2learn API).')
    parser.add_argument('--train-ways', type=int, default=60)
    parser.add_argument('--train-query', type=int, default=5)
    parser.add_argument('--test-ways', type=int, default=5)
    parser.add_argument('--test-query', type=int, default=5)
    parser.add_argument('--shots', type=int, default=1)
    parser.add_argument('--max-epoch', type=int, default=250)
    parser.add_argument('--episodes-per-epoch', type=int, default=100)
    parser.add_argument('--val-episodes', type=int, default=100)
    parser.add_argument('--test-episodes', type=int, default=1000)
    parser.add_argument('--lr', type=float, default=0.001)
    parser.add_argument('--lr-step', type=int, default=20, help='epochs between halvings of the learning rate')
    parser.add_argument('--metric', choices=['euclidean', 'cosine'], default='euclidean')
    parser.add_argument('--hidden-size', type=int, default=64)
    parser.add_argument('--dataset', default='omniglot', help='the get_tasksets benchmark name')
    parser.add_argument('--root', default='~/data', help='the data root')
    parser.add_argument('--config', type=config_option, default=None,
                        help='passed to get_tasksets as config= when given (metalearn: a data preset '
                             'name or a JSON object of dataset options)')
    parser.add_argument('--num-tasks', type=int, default=-1, help='tasks per split (-1: a new task every time)')
    parser.add_argument('--no-cuda', dest='cuda', action='store_false')
    parser.add_argument('--seed', type=int, default=42)
    main(**vars(parser.parse_args()))
