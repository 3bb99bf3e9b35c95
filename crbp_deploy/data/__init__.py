"""Datasets: Pathfinder generator, synthetic panoptic set, COCO panoptic I/O."""
