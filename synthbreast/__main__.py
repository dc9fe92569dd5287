from synthbreast.cli import app

app(prog_name="synthbreast")
