"""Streamed U-Nets at growing image sizes: time and peak memory against conventional training."""
