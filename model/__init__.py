"""Models: backbones, the PIC head, the instance bank and its closed-form weight correction."""
