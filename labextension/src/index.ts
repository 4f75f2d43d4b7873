/**
 * microagent-jupyter: a JupyterLab sidebar panel for microagent workspaces and volumes.
 */
import {
  ILabShell,
  ILayoutRestorer,
  JupyterFrontEnd,
  JupyterFrontEndPlugin
} from '@jupyterlab/application';
import {
  Dialog,
  ICommandPalette,
  showDialog,
  showErrorMessage
} from '@jupyterlab/apputils';
import { ISettingRegistry } from '@jupyterlab/settingregistry';
import { IStatusBar } from '@jupyterlab/statusbar';
import { LabIcon } from '@jupyterlab/ui-components';
import { Widget } from '@lumino/widgets';

import { MicroagentPanel, PanelAction, actionAllowed } from './panel';
import { INotebookLike, SandboxStatus } from './sandboxStatus';

const PLUGIN_ID = 'microagent-jupyter:plugin';
const CATEGORY = 'microagent';

const ICON_SVG = `<svg xmlns="http://www.w3.org/2000/svg" width="16" height="16" viewBox="0 0 24 24">
  <g class="jp-icon3" fill="#616161">
    <path d="M4 3h16a1 1 0 0 1 1 1v10a1 1 0 0 1-1 1H4a1 1 0 0 1-1-1V4a1 1 0 0 1 1-1zm1 2v8h14V5H5z"/>
    <path d="M6.5 7.2l2.6 1.8-2.6 1.8V7.2zM10.5 10h4v1.2h-4z"/>
    <path d="M3 17h18v4H3zm2 1.3v1.4h1.4v-1.4zm3 0v1.4h1.4v-1.4z"/>
  </g>
</svg>`;

export const microagentIcon = new LabIcon({
  name: 'microagent-jupyter:icon',
  svgstr: ICON_SVG
});

export namespace CommandIDs {
  export const openPanel = 'microagent:open-panel';
  export const refresh = 'microagent:refresh';
  export const start = 'microagent:start';
  export const halt = 'microagent:halt';
  export const stop = 'microagent:stop';
  export const kill = 'microagent:kill';
  export const remove = 'microagent:delete';
  export const createVolume = 'microagent:create-volume';
}

const WORKSPACE_COMMANDS: [string, PanelAction, string][] = [
  [CommandIDs.start, 'start', 'Start Workspace'],
  [CommandIDs.halt, 'halt', 'Halt Workspace'],
  [CommandIDs.stop, 'stop', 'Stop Workspace'],
  [CommandIDs.kill, 'kill', 'Kill Workspace'],
  [CommandIDs.remove, 'delete', 'Delete Workspace']
];

/** The body of the create-volume dialog. */
class VolumeDialogBody
  extends Widget
  implements Dialog.IBodyWidget<{ name: string; sizeMiB: number | undefined }>
{
  constructor() {
    super();
    this.addClass('ma-VolumeDialog');
    this._name.className = 'jp-mod-styled ma-VolumeName';
    this._name.placeholder = 'name';
    this._name.setAttribute('aria-label', 'Volume name');
    this._size.className = 'jp-mod-styled ma-VolumeSize';
    this._size.type = 'number';
    this._size.min = '8';
    this._size.value = '1024';
    this._size.setAttribute('aria-label', 'Size in MiB');
    const nameLabel = document.createElement('label');
    nameLabel.textContent = 'Name';
    nameLabel.append(this._name);
    const sizeLabel = document.createElement('label');
    sizeLabel.textContent = 'Size (MiB)';
    sizeLabel.append(this._size);
    this.node.append(nameLabel, sizeLabel);
  }

  getValue(): { name: string; sizeMiB: number | undefined } {
    const size = this._size.value.trim();
    return {
      name: this._name.value.trim(),
      sizeMiB: size ? Number(size) : undefined
    };
  }

  protected onAfterAttach(): void {
    this._name.focus();
  }

  private _name = document.createElement('input');
  private _size = document.createElement('input');
}

const plugin: JupyterFrontEndPlugin<void> = {
  id: PLUGIN_ID,
  description:
    'A sidebar panel for microagent microVM workspaces: state, readiness, volumes, serial logs and actions.',
  autoStart: true,
  optional: [ICommandPalette, ISettingRegistry, ILayoutRestorer, IStatusBar, ILabShell],
  activate: (
    app: JupyterFrontEnd,
    palette: ICommandPalette | null,
    settingRegistry: ISettingRegistry | null,
    restorer: ILayoutRestorer | null,
    statusBar: IStatusBar | null,
    labShell: ILabShell | null
  ) => {
    const panel = new MicroagentPanel();
    panel.title.icon = microagentIcon;
    app.shell.add(panel, 'left', { rank: 650 });
    if (restorer) {
      restorer.add(panel, 'microagent-panel');
    }

    const sandbox = new SandboxStatus(
      () => (labShell?.currentWidget ?? null) as INotebookLike | null
    );
    sandbox.id = 'microagent-sandbox-status';
    if (statusBar) {
      statusBar.registerStatusItem('microagent-jupyter:sandbox-status', {
        item: sandbox,
        align: 'left',
        rank: 5
      });
    }
    labShell?.currentChanged.connect(() => sandbox.poke());
    sandbox.start();

    if (settingRegistry) {
      settingRegistry
        .load(PLUGIN_ID)
        .then(settings => {
          const apply = () => {
            panel.refreshInterval = Number(
              settings.get('refreshInterval').composite
            );
          };
          apply();
          settings.changed.connect(apply);
        })
        .catch(reason => {
          console.warn('microagent: could not load settings', reason);
        });
    }

    const { commands } = app;
    const notify = () => {
      for (const [id] of WORKSPACE_COMMANDS) {
        commands.notifyCommandChanged(id);
      }
    };
    panel.selectionChanged.connect(notify);
    panel.refreshed.connect(notify);

    commands.addCommand(CommandIDs.openPanel, {
      label: 'Open microagent Panel',
      caption: 'Show the microagent workspaces panel',
      icon: args => (args.isPalette ? undefined : microagentIcon),
      execute: () => {
        app.shell.activateById(panel.id);
      }
    });

    commands.addCommand(CommandIDs.refresh, {
      label: 'Refresh microagent Workspaces',
      execute: () => panel.refresh()
    });

    for (const [id, action, label] of WORKSPACE_COMMANDS) {
      commands.addCommand(id, {
        label: args => {
          const name = (args.name as string) || panel.selected;
          return name ? `${label} "${name}"` : label;
        },
        caption: `${label} (the one selected in the microagent panel, or args.name)`,
        isEnabled: args => {
          const name = (args.name as string) || panel.selected;
          if (!name) {
            return false;
          }
          const ws = panel.workspaces.get(name);
          return actionAllowed(action, ws);
        },
        execute: args =>
          panel.runAction(action, (args.name as string) || panel.selected)
      });
    }

    commands.addCommand(CommandIDs.createVolume, {
      label: 'Create microagent Volume…',
      caption: 'Create a named ext4 volume (args: name, sizeMiB)',
      execute: async args => {
        let name = args.name as string | undefined;
        let sizeMiB = args.sizeMiB as number | undefined;
        if (!name) {
          const result = await showDialog({
            title: 'Create volume',
            body: new VolumeDialogBody(),
            buttons: [
              Dialog.cancelButton(),
              Dialog.okButton({ label: 'Create' })
            ],
            focusNodeSelector: 'input'
          });
          if (!result.button.accept || !result.value) {
            return false;
          }
          ({ name, sizeMiB } = result.value);
          if (!name) {
            await showErrorMessage(
              'Create volume',
              'Give the volume a name.'
            );
            return false;
          }
          if (sizeMiB !== undefined && !Number.isInteger(sizeMiB)) {
            await showErrorMessage(
              'Create volume',
              'The size must be a whole number of MiB.'
            );
            return false;
          }
        }
        const ok = await panel.createVolume(name, sizeMiB);
        if (!ok && !panel.isVisible) {
          app.shell.activateById(panel.id);
        }
        return ok;
      }
    });

    if (palette) {
      for (const command of [
        CommandIDs.openPanel,
        CommandIDs.refresh,
        ...WORKSPACE_COMMANDS.map(([id]) => id),
        CommandIDs.createVolume
      ]) {
        palette.addItem({ command, category: CATEGORY });
      }
    }
  }
};

export default plugin;
