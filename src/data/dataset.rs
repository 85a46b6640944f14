//! Datasets: image folders, label files, Fashion-MNIST.
