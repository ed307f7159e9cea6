"""The reference's entry name, kept so its commands run unchanged: the same job as train.py, with the same
flags and the same FLAG_* environment switches (read by sd/args.py parse_train, whatever launched it)."""
from train import cli

if __name__ == "__main__":
    cli()
