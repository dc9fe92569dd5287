"""nn.Modules and their configs only: no files, no Accelerator, no CLI."""
