"""The host side: how input files are opened and read (``files``), and signals held off while an
output is finished (``interrupts``). Below every other layer; knows nothing of formats."""
