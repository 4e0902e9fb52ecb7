// QGPT Code for VS Code: starts `qgpt lsp` over stdio with vscode-languageclient 10, which provides
// inline (ghost-text) completions from the server's textDocument/inlineCompletion. The server's own
// commands (qgpt.editSelection, qgpt.chat, qgpt.stats) are registered by the client library; this file
// adds the palette commands that ask for an instruction, and keeps the server's settings in sync.
import * as vscode from 'vscode';
import {
  DidChangeConfigurationNotification,
  ExecuteCommandRequest,
  LanguageClient,
  LanguageClientOptions,
  ServerOptions,
  TransportKind,
} from 'vscode-languageclient/node';

let client: LanguageClient | undefined;

// Settings under `qgpt.` that belong to the extension rather than the server.
const EXTENSION_ONLY = new Set(['command']);

/** The server's settings: every `qgpt.*` setting declared in package.json except the extension's own. */
function serverSettings(context: vscode.ExtensionContext): Record<string, unknown> {
  const declared = context.extension.packageJSON.contributes.configuration.properties as Record<string, unknown>;
  const config = vscode.workspace.getConfiguration('qgpt');
  const settings: Record<string, unknown> = {};
  for (const key of Object.keys(declared)) {
    const name = key.slice('qgpt.'.length);
    if (!EXTENSION_ONLY.has(name)) {
      settings[name] = config.get(name);
    }
  }
  return settings;
}

/** Ask for the missing instruction (edit) or question (chat) of a command from a code action. */
async function withInput(command: string, args: any[]): Promise<any[] | undefined> {
  const field = command === 'qgpt.editSelection' ? 'instruction' : command === 'qgpt.chat' ? 'question' : undefined;
  if (!field || args.length !== 1 || typeof args[0] !== 'object' || args[0][field]) {
    return args;
  }
  const text = await vscode.window.showInputBox({
    prompt: field === 'instruction' ? 'How should QGPT change the selection?' : 'Ask QGPT about the code',
    placeHolder: field === 'instruction' ? 'e.g. add type hints' : 'e.g. what does this do?',
  });
  return text ? [{ ...args[0], [field]: text }] : undefined;
}

async function runOnSelection(command: 'qgpt.editSelection' | 'qgpt.chat'): Promise<void> {
  const editor = vscode.window.activeTextEditor;
  if (!client || !editor) {
    return;
  }
  const converter = client.code2ProtocolConverter;
  const args = await withInput(command, [{
    uri: converter.asUri(editor.document.uri),
    range: converter.asRange(editor.selection),
  }]);
  if (!args) {
    return;
  }
  if (command === 'qgpt.editSelection' && editor.selection.isEmpty) {
    void vscode.window.showWarningMessage('QGPT: select the code to edit first');
    return;
  }
  const result = await client.sendRequest(ExecuteCommandRequest.type, { command, arguments: args });
  if (command === 'qgpt.editSelection' && result && !result.applied && result.message && result.message !== 'cancelled') {
    void vscode.window.showWarningMessage(`QGPT: ${result.message}`);
  }
}

export async function activate(context: vscode.ExtensionContext): Promise<void> {
  const output = vscode.window.createOutputChannel('QGPT', { log: true });
  const [command, ...args] = vscode.workspace.getConfiguration('qgpt').get<string[]>('command', ['qgpt', 'lsp']);
  const serverOptions: ServerOptions = { command, args, transport: TransportKind.stdio };
  const clientOptions: LanguageClientOptions = {
    documentSelector: [{ scheme: 'file' }, { scheme: 'untitled' }],
    initializationOptions: serverSettings(context),
    outputChannel: output,
    middleware: {
      // code actions carry no instruction: ask for it before the command reaches the server
      executeCommand: async (name, commandArgs, next) => {
        const completed = await withInput(name, commandArgs);
        return completed ? next(name, completed) : undefined;
      },
    },
  };
  client = new LanguageClient('qgpt', 'QGPT Code', serverOptions, clientOptions);

  context.subscriptions.push(
    vscode.workspace.onDidChangeConfiguration((event) => {
      if (event.affectsConfiguration('qgpt') && client?.isRunning()) {
        void client.sendNotification(DidChangeConfigurationNotification.type, {
          settings: { qgpt: serverSettings(context) },
        });
      }
    }),
    vscode.commands.registerCommand('qgpt.edit', () => runOnSelection('qgpt.editSelection')),
    vscode.commands.registerCommand('qgpt.ask', () => runOnSelection('qgpt.chat')),
    vscode.commands.registerCommand('qgpt.showStats', async () => {
      const stats = await client?.sendRequest(ExecuteCommandRequest.type, { command: 'qgpt.stats' });
      output.appendLine(JSON.stringify(stats, null, 2));
      output.show(true);
    }),
    vscode.commands.registerCommand('qgpt.restart', async () => {
      await client?.restart();
    }),
  );
  await client.start();
}

export async function deactivate(): Promise<void> {
  await client?.stop();
}
