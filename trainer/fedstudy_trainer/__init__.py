"""The site trainer: data, preprocessing, models, local training, evaluation."""
