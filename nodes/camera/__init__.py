"""Cameras: capture, motion, tracked object events, snapshots and the armed alarm rule."""
