"""Graph work before and around quantization: preparation, exact rewrites, Q/DQ placement, inspection."""
