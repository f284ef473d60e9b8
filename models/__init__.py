"""Flax NNX networks (encoder, decoder, encoder-decoder), their sizes and checkpoint converters."""
