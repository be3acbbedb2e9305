"""From rows to decisions: the review queue, relabelling, export, similar images."""
