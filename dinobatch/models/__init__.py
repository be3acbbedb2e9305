"""The dinobatch model file, its diagnoses, and its forward pass."""
