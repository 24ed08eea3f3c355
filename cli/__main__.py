from adamshap_cli.main import app

app(prog_name="adamshap")
