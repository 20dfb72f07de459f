"""Datasets: COCO JSON (the one format inside the project), VOC import, the synthetic benchmark set.

``annotations``, ``images``, ``voc`` and ``synthetic`` are torch-free; ``dataset`` holds the torch Dataset and batching.
"""
